"""The experiment framework the report drivers in scripts/ stand on: stages (timed subprocesses whose reuse is
decided by the files the package commits last), the pipeline's command lines, and reports rendered from
metrics.json alone. Imports the standard library, numpy, matplotlib and the core; fairseq only runs as a
subprocess.
"""
