"""``python -m vrmoe``: the ``vrmoe`` command (what ``torchrun -m vrmoe train ...`` runs)."""

from .cli import main

main()
