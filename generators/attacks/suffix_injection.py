"""Suffix injection: the request followed by an instruction that pushes the reply to comply (start affirmatively,
skip caveats, commit to a format). Templates: data/suffix_injection.yaml."""

from orforge.generators.attacks import register_template_attack

suffix_injection = register_template_attack("suffix_injection")
