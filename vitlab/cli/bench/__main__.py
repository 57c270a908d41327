"""python -m vitlab.cli.bench: the same as vitlab-bench."""

from vitlab.cli.bench import main

main()
