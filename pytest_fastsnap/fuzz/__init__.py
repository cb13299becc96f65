"""Structure-aware fuzzing of QEMU's snapshot loading and of our own readers.

``mutators`` makes edits that know the mapped-ram format, ``campaign`` loads
each mutant into a fresh QEMU and classifies the outcome (``outcomes``),
``triage`` deduplicates and minimises findings, ``differential`` compares the
C and Python readers, ``merge`` joins campaigns, ``libfuzzer`` drives the C
parser harness.
"""
