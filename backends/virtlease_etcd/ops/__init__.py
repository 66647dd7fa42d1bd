"""Lock operations over a session: grants, releases, migration handoff, records, status."""
