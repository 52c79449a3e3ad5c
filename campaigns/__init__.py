"""Hardening campaigns (issue 14): scripts that try to break mvc many times over and count the
failures. Each has a count flag; the tests run short versions, docs/hardening.md reports long ones.

    python -m campaigns kill9 --runs 1000          # SIGKILL at random moments of 10 commands
    python -m campaigns fuzz --cases 10000         # every parser of outside bytes
    python -m campaigns concurrency --seconds 120  # processes committing, fetching, gc-ing, checking out
    python -m campaigns race --rounds 100          # diverging pushes to one S3 ref (moto)
"""
