"""The clinical knowledge of imnm-cds: rule modules (durable-rules DSL) and the cited data they use."""

from rules import cancer, differential, imnm, severity, statin

# Each module has define(knowledge, emit), which registers its rules in the active ruleset.
RULE_MODULES = (imnm, statin, differential, severity, cancer)
