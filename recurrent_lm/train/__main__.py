"""``python -m recurrent_lm.train``: see `recurrent_lm.train.cli`."""

from recurrent_lm.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
