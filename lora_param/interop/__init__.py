"""Interchange with other libraries' formats and workflows (PEFT, ...); optional dependencies."""
