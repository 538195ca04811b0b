"""Every flag of every `ldmole` subcommand says what it does."""

from ldmole_cli.main import build_parser


def test_every_flag_has_a_help_text():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items()
               for a in p._actions if a.dest != "help" and not (a.help or "").strip()]
    assert missing == []
    train_help = sub.choices["train"].format_help()
    for listed in ("social_iqa", "piqa", "siqa=social_iqa", "cloze", "letter", "sparsegen", "lora", "cosine"):
        assert listed in train_help
