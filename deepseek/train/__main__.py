"""``python -m deepseek.train CONFIG [key=value ...]``: what plain ``torchrun -m deepseek.train …`` runs.

The same run as ``ds train`` (without its ``--nproc`` re-launch, which torchrun does here).
"""

from __future__ import annotations

import sys

from deepseek.config import ConfigError
from deepseek.errors import UserError


def main(argv: list[str]) -> int:
    from deepseek.train.lm import train_lm
    from deepseek.train.config import load_train_config

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    config = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if config is not None else argv
    try:
        train_lm(load_train_config(config, overrides))
    except UserError as exc:  # the user's to fix: one line (torchrun adds which rank failed)
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
