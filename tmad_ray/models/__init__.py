"""Models: teacher, student and the one loader (hf), the AMD assistant (amd), the toy zoo (toyzoo),
and their subcommands (cli)."""
