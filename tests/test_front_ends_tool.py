"""The front-end coverage tool measures what it says on a zoo of its own (two cases)."""

from __future__ import annotations

import textwrap

from tread_fx.tools import front_ends

ZOO = textwrap.dedent('''
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
        def forward(self, x):
            return x + self.lin(x)

    class ValueBranch(nn.Module):      # export refuses the branch; the concrete tracer guards it
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(4))
        def forward(self, x, t):
            if (t > 0.5).all():
                x = -x
            for b in self.blocks:
                x = b(x)
            return x

    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
        def forward(self, x, t):
            return self.lin(x)

    CASES = [{"name": "ValueBranch", "cls": "ValueBranch", "init": {}},
             {"name": "NoBlocks", "cls": "NoBlocks", "init": {}}]

    def build(case):
        torch.manual_seed(0)
        model = globals()[case["cls"]](**case["init"])
        return model, {"x": torch.randn(2, 6, 8), "t": torch.full((2,), 0.9)}
''')


def test_front_ends_tool_on_a_small_zoo(tmp_path, capsys):
    zoo = tmp_path / "zoo.py"
    zoo.write_text(ZOO)
    out = tmp_path / "report.md"
    assert front_ends.main(["--zoo", str(zoo), "--out", str(out), "--in-process"]) == 0
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| ValueBranch"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].startswith("ExportError") and cells[2] == "ok"
    assert "yes" in cells[5] and "yes" in cells[6]      # eval and ratio-0 equal (concrete)
    row = next(line for line in text.splitlines() if line.startswith("| NoBlocks"))
    assert "NoBlocksFound" in row


def test_a_case_passes_what_a_user_would_tell_route(tmp_path):
    """A zoo case's ``blocks``, ``hidden`` and ``token_inputs`` reach route() as options."""
    zoo = tmp_path / "zoo.py"
    zoo.write_text(ZOO)
    module = front_ends.load_zoo(zoo)
    case = {"name": "ValueBranch", "cls": "ValueBranch", "init": {}, "blocks": "blocks",
            "token_inputs": {"x": 1}, "notes": ["not an option"]}
    _, _, options = front_ends.build_case(module, case)
    assert options == {"blocks": "blocks", "token_inputs": {"x": 1}}
