"""``python -m tokenmixers ...`` (e.g. under ``torchrun -m``) runs the ``tokenmixers`` command line."""
from tokenmixers_cli import main

main()
