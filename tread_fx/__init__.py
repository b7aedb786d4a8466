"""tread_fx"""
