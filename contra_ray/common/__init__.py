"""Small shared pieces: file I/O (atomic writes, locks, strict YAML), seed roles, number types of the command
lines, the CLI's shared config flags, and the one Ray start policy."""
