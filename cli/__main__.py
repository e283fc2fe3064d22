"""`python -m sparsify_cli` (also what `accelerate launch -m sparsify_cli` runs)."""

from .main import main

main()
