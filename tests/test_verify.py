"""tread_fx.verify on a slice of the diffusers zoo, and on models where it must say no."""

import pytest
import torch
from torch import nn

import tread_fx
from tread_fx.tools.diffusers_zoo import CASES, build
from tread_fx.tools.zoo import perturb_
from tread_fx.verify import verify
from conftest import break_side_gather

pytest.importorskip("diffusers")

_CASES = {c["name"]: c for c in CASES}


def _zoo(name):
    model, inputs = build(_CASES[name])
    return perturb_(model), inputs   # zero-initialised output layers would hide errors


# Flux (double-stream blocks, RoPE), Wan (video, RoPE given positionally), SD3 (joint
# attention with the image first), HunyuanDiT (long skips, RoPE), Chroma routed in its
# single-stream blocks (a stream of text + image rows: the text rows must stay).
SLICE = [
    ("FluxTransformer2DModel", "1:2@0.5"),
    ("WanTransformer3DModel", "1:2@0.5"),
    ("SD3Transformer2DModel", "1:2@0.5"),
    ("HunyuanDiT2DModel", "1:2@0.5"),
    ("ChromaTransformer2DModel", "5:6@0.5"),
]


@pytest.mark.parametrize("name,spec", SLICE)
def test_verify_passes_on_the_zoo_slice(name, spec):
    model, inputs = _zoo(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = verify(model, spec, inputs)
    assert report.ok, str(report)
    assert report.eval_equal and report.ratio0_equal and report.reference == "equal"
    assert all(r.kept < r.tokens for r in report.routes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    text = str(report)
    assert "verified" in text and f"keeps {report.routes[0].kept} of" in text


def test_verify_reports_text_rows_kept_and_checks_them():
    model, inputs = _zoo("ChromaTransformer2DModel")
    report = verify(model, "5:6@0.5", inputs)
    route = report.routes[0]
    text_len = inputs["encoder_hidden_states"].shape[1]
    assert route.never_routed == (text_len, 0)
    assert route.tokens == text_len + inputs["hidden_states"].shape[1]
    assert report.rows == "ok" and f"{text_len} row(s) the output never reads" in report.rows_detail
    assert any("rotary" in s for s in route.side_inputs)


def test_verify_catches_a_wrong_rope_gather(monkeypatch):
    break_side_gather(monkeypatch)
    model, inputs = _zoo("FluxTransformer2DModel")
    report = verify(model, "1:2@0.5", inputs)
    assert report.eval_equal and report.ratio0_equal   # ratio 0 and eval cannot see it ...
    assert report.reference == "differs" and not report.ok   # ... the reference does
    assert "NOT verified" in str(report)


def test_verify_catches_text_rows_routed(monkeypatch):
    """If the pass took the text rows of a joint stream for image rows, the reference
    (which masks what the routed model dropped) can agree: the row check does not."""
    from tread_fx.passes import token_axes

    monkeypatch.setattr(token_axes, "fixed_rows", lambda *args, **kwargs: (0, 0))
    model, inputs = _zoo("ChromaTransformer2DModel")
    report = verify(model, "5:6@0.5", inputs)
    assert report.routes[0].never_routed == (0, 0)
    assert report.rows == "wrong" and not report.ok
    assert "never reads" in report.rows_detail


class _ConvMix(nn.Module):
    """A block that mixes neighbouring tokens with a convolution before its attention."""

    def __init__(self, dim=16):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        return x + nn.functional.scaled_dot_product_attention(q, k, v)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_ConvMix() for _ in range(4))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_verify_says_cannot_verify_for_blocks_that_mix_tokens_outside_attention():
    torch.manual_seed(0)
    report = verify(_ConvNet(), "1:2@0.5", (torch.randn(2, 12, 16),))
    assert report.reference == "cannot verify" and not report.ok
    assert "block 1 (_ConvMix)" in report.reference_detail
    assert "mixes tokens before this attention" in report.reference_detail


def test_verify_says_inconclusive_when_the_output_ignores_the_blocks():
    from tread_fx.models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4,
                num_heads=2, num_classes=10)   # zero-initialised final layer and adaLN
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2) * 999, torch.randint(0, 10, (2,))
    report = verify(model, "1:2@0.5", (x, t, y))
    assert report.reference == "inconclusive" and not report.ok
    report = verify(perturb_(model), "1:2@0.5", (x, t, y))
    assert report.ok, str(report)


def test_verify_refusal_names_the_block():
    model, inputs = _zoo("SanaTransformer2DModel")
    with pytest.raises(tread_fx.RoutingSafetyError, match="transformer_blocks.1"):
        verify(model, "1:2@0.5", inputs)


def test_cli_verify_prints_the_report_and_exits_0(capsys):
    from tread_fx.tools.cli import main

    assert main(["verify", "DiT", "--routes", "1:2@0.5"]) == 0
    out = capsys.readouterr().out
    assert "routed step = independent reference:      equal" in out
    assert out.rstrip().endswith("verified")


def test_cli_verify_bad_input_is_one_line_exit_2(capsys):
    from tread_fx.tools.cli import main

    assert main(["verify", "NoSuchModel"]) == 2
    assert main(["verify", "PriorTransformer"]) == 2    # refused by route(): one line, why
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tread-fx verify: error:")]
    assert len(errors) == 2 and "Traceback" not in err
    assert "routes no token of 1" in errors[1]


def test_support_table_tool_on_two_cases(tmp_path, capsys):
    import argparse

    from tread_fx.tools import support

    p = argparse.ArgumentParser()
    support.add_arguments(p)
    args = p.parse_args(["--cases", "DiTTransformer2DModel,PriorTransformer",
                         "--out", str(tmp_path / "t.md"), "--in-process"])
    assert support.main(args) == 0
    table = (tmp_path / "t.md").read_text()
    assert table.startswith("2 cases of diffusers_zoo.py: 1 verified, 1 refused")
    assert "| DiTTransformer2DModel | export | 4 | 1:-2@0.5 | verified |" in table
    assert "| PriorTransformer |" in table and "**refused**" in table
