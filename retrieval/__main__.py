"""`python -m retrieval ...` runs the command line, exactly as the `retrieval` script does."""

from retrieval.cli import main

main()
