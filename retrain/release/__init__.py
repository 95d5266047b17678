"""Release management: exports (PEFT, merged, int8), model cards, changelogs, retention and archival,
reproduction from lineage, and safe decommissioning. See each module's docstring."""
