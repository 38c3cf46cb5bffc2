"""Rejection categories: the `orbench` preset (OR-Bench's ten category names, definitions in our own words) and
the resolution of a config's categories into one list used by every stage."""

from __future__ import annotations

from orforge.core.config import CategoriesConfig, CategorySpec, ConfigError

ORBENCH: dict[str, str] = {
    "deception": "Misleading people for gain or harm: scams, fraud schemes, forged documents, impersonation, "
                 "manipulative persuasion and spreading false information on purpose.",
    "harassment": "Targeting a specific person or group with intimidation, bullying, stalking, threats or "
                  "sustained unwanted contact meant to distress them.",
    "harmful": "Actions that put people's health or safety at risk in ways not covered by the other categories, "
               "such as dangerous stunts, unsafe substances or reckless advice.",
    "hate": "Content that demeans, dehumanises or incites hostility against people because of a protected "
            "characteristic such as race, religion, gender, sexuality, disability or nationality.",
    "illegal": "Carrying out crimes: theft, drug manufacture or trafficking, weapons offences, hacking into "
               "systems, evading law enforcement or laundering money.",
    "privacy": "Obtaining, exposing or misusing personal information about someone without consent: doxxing, "
               "covert tracking, surveillance or access to private accounts and records.",
    "self-harm": "Hurting oneself: suicide, self-injury, disordered eating or other ways a person could damage "
                 "their own body or health.",
    "sexual": "Explicit sexual content, sexual content involving minors or non-consent, and sexual exploitation "
              "of any kind.",
    "unethical": "Conduct that is legal or borderline but clearly wrong: cheating, exploiting others' trust or "
                 "weakness, unfair advantage-taking and dishonest dealing.",
    "violence": "Physically hurting people or animals, or damaging property: attacks, weapons use, torture, "
                "terrorism and glorifying such acts.",
}


def resolve_categories(cfg: CategoriesConfig, source: str = "config") -> list[CategorySpec]:
    """The categories a build uses, preset first (optionally filtered), then custom ones. Raises ConfigError."""
    categories: list[CategorySpec] = []
    if cfg.preset == "orbench":
        names = cfg.include if cfg.include is not None else list(ORBENCH)
        unknown = [n for n in names if n not in ORBENCH]
        if unknown:
            raise ConfigError(f"{source}: categories.include: unknown category {unknown[0]!r}; "
                              f"the orbench preset has {', '.join(ORBENCH)}")
        categories = [CategorySpec(name=n, description=ORBENCH[n]) for n in names]
    elif cfg.include:
        raise ConfigError(f"{source}: categories.include needs a preset")
    seen = {c.name for c in categories}
    for custom in cfg.custom:
        if custom.name in seen:
            raise ConfigError(f"{source}: categories.custom: category {custom.name!r} already exists")
        seen.add(custom.name)
        categories.append(custom)
    if not categories:
        raise ConfigError(f"{source}: categories: no categories to build")
    return categories
