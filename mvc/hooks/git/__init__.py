"""Git integration: the pointer format, pkt-line protocol, the clean/smudge filter, diff and merge drivers,
and the walk of Git's history for fsck/gc."""
