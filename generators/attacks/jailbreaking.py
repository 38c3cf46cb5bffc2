"""Jailbreaking: role-play and persona wrappers that move the request into a fiction, a game or a character that
"has no limits". Templates: data/jailbreaking.yaml."""

from orforge.generators.attacks import register_template_attack

jailbreaking = register_template_attack("jailbreaking")
