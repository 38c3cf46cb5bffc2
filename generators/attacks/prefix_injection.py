"""Prefix injection: an opening that tries to override the model's rules before the request arrives (a claimed
mode switch, a fake authorisation, a dismissal of earlier instructions). Templates: data/prefix_injection.yaml."""

from orforge.generators.attacks import register_template_attack

prefix_injection = register_template_attack("prefix_injection")
