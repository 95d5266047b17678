"""Deterministic generator of the labelled guardrail evaluation set.

    python tests/data/guardrails/generate.py   # rewrites eval_dev.jsonl, eval_heldout.jsonl, eval_blind.jsonl

Three splits built from disjoint sentence templates, attack phrasings and seeds: `dev` (what detector work
may look at), `heldout` (first measured blind; its misses then prompted general fixes, so it is reported
before and after them) and `blind` (written after those fixes and never used to change a detector). Each line: {"id", "split", "kind", "text", "spans":
[{"type", "start", "end"}], "attack": type or null, "obfuscation": how an attack is hidden, or null}. `kind` is pii | secret | injection | benign | tricky
(benign text that looks risky: invalid card numbers, private IPs, placeholders, security talk...).
"""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path
from random import Random

sys.path.insert(0, str(Path(__file__).parent))
import eval_templates as templates
import eval_values as values

HERE = Path(__file__).parent
FIELD = re.compile(r"\{([A-Z_]+)\}")
SECRET_TYPES = ("AWS_ACCESS_KEY", "GITHUB_TOKEN", "SLACK_TOKEN", "GOOGLE_API_KEY", "STRIPE_KEY", "OPENAI_API_KEY",
                "HUGGINGFACE_TOKEN", "JWT", "PRIVATE_KEY", "SECRET", "PASSWORD")


def value_for(field: str, rng: Random) -> tuple[str, str | None]:
    """(text, label type or None) for a template field."""
    pii = {"EMAIL": values.email, "PHONE_NUMBER": values.phone, "CREDIT_CARD": values.card, "IBAN": values.iban,
           "US_SSN": values.ssn, "DATE_OF_BIRTH": values.date}
    if field in pii:
        return pii[field](rng), field
    if field == "IP_ADDRESS":
        return (values.ipv4(rng) if rng.random() < 0.7 else values.ipv6(rng)), field
    if field == "SSN_BARE":
        return values.ssn(rng, sep=""), "US_SSN"
    if field in SECRET_TYPES:
        return values.secret(rng, field), field
    # unlabelled fillers and near misses
    d = lambda n: "".join(rng.choice("0123456789") for _ in range(n))  # noqa: E731
    fillers = {
        "NAME": lambda: f"{rng.choice(values.FIRST).title()} {rng.choice(values.LAST).title()}",
        "BAD_CARD": lambda: values.card(rng, valid=False),
        "BAD_IBAN": lambda: values.iban(rng, valid=False),
        "BAD_SSN": lambda: values.ssn(rng, valid=False),
        "PRIVATE_IP": lambda: rng.choice([f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                                          f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                                          "127.0.0.1", f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.1"]),
        "ORDER": lambda: rng.choice([f"#{d(8)}", f"A{d(9)}", f"{d(3)}-{d(7)}", f"ORD-{d(6)}"]),
        "DATE": lambda: values.date(rng, (2018, 2026)),
        "MONEY": lambda: rng.choice([f"${rng.randint(5, 4999)}.{d(2)}", f"{rng.randint(2, 90)},{d(3)} EUR",
                                     f"£{rng.randint(1, 999)}"]),
        "VERSION": lambda: f"{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 20)}",
        "UUID": lambda: "-".join(values._token(rng, "0123456789abcdef", n) for n in (8, 4, 4, 4, 12)),
        "SHA": lambda: values._token(rng, "0123456789abcdef", 40),
        "ISBN": lambda: f"978-{rng.randint(0, 9)}-{d(3)}-{d(5)}-{rng.randint(0, 9)}",
        "NUMBER": lambda: str(rng.randint(2, 100000)),
        "TIME": lambda: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
        "PORT": lambda: str(rng.choice([80, 443, 5432, 6379, 8000, 8080, 9092])),
        "TRACKING": lambda: f"1Z{values._token(rng, 'ABCDEFGHJKLMNPRSTUVWXYZ0123456789', 16)}",
    }
    return fillers[field](), None


def fill(template: str, rng: Random) -> tuple[str, list[dict[str, object]]]:
    out, spans, pos = [], [], 0
    length = 0
    for m in FIELD.finditer(template):
        out.append(template[pos:m.start()])
        length += m.start() - pos
        text, label = value_for(m.group(1), rng)
        if label is not None:
            spans.append({"type": label, "start": length, "end": length + len(text)})
        out.append(text)
        length += len(text)
        pos = m.end()
    out.append(template[pos:])
    return "".join(out), spans


# --- obfuscations applied to attack texts -------------------------------------------------------------

HOMOGLYPHS = {"a": "\u0430", "e": "\u0435", "o": "\u043e", "p": "\u0440", "c": "\u0441", "i": "\u0456"}
LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}


def obfuscate(text: str, how: str, rng: Random) -> str:
    if how == "plain":
        return text
    if how == "upper":
        return text.upper()
    if how == "leet":
        return "".join(LEET[c] if c in LEET and rng.random() < 0.6 else c for c in text)
    if how == "homoglyph":
        return "".join(HOMOGLYPHS[c] if c in HOMOGLYPHS and rng.random() < 0.5 else c for c in text)
    if how == "zero_width":
        return "".join(c + ("\u200b" if c.isalpha() and rng.random() < 0.3 else "") for c in text)
    if how == "fullwidth":
        return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)
    if how == "spaced":
        return "  ".join(" ".join(w) for w in text.split())
    if how == "base64":
        wrapper = rng.choice(templates.ENCODED_WRAPPERS)
        return wrapper.format(base64.b64encode(text.encode()).decode())
    if how == "hex":
        return rng.choice(templates.ENCODED_WRAPPERS).format(text.encode().hex())
    if how == "tags":  # Unicode tag characters: invisible ASCII
        return rng.choice(templates.HIDDEN_CARRIERS) + "".join(chr(0xE0000 + ord(c)) for c in text if ord(c) < 128)
    raise ValueError(how)


def build(split: str, seed: int, counts: dict[str, int]) -> list[dict[str, object]]:
    rng = Random(seed)
    t = {"dev": templates.DEV, "heldout": templates.HELDOUT, "blind": templates.BLIND}[split]
    rows: list[dict[str, object]] = []

    def add(kind: str, text: str, spans: list[dict[str, object]], attack: str | None = None,
            obfuscation: str | None = None) -> None:
        rows.append({"id": f"{split}-{len(rows):05d}", "split": split, "kind": kind, "text": text,
                     "spans": spans, "attack": attack, "obfuscation": obfuscation})

    for kind, pool in (("pii", t["pii"]), ("secret", t["secret"])):
        for i in range(counts[kind]):
            text, spans = fill(pool[i % len(pool)], rng)
            add(kind, text, spans)
    attacks = t["attacks"]
    hows = t["obfuscations"]
    for i in range(counts["injection"]):
        attack_type, phrase = attacks[i % len(attacks)]
        phrase = fill(phrase, rng)[0]
        how = hows[(i // len(attacks)) % len(hows)] if i >= len(attacks) else "plain"
        wrapper = rng.choice(t["carriers"])
        text = wrapper.format(obfuscate(phrase, how, rng))
        add("injection", text, [], attack_type, how)
    for kind in ("benign", "tricky"):
        pool = t[kind]
        for i in range(counts[kind]):
            text, spans = fill(pool[i % len(pool)], rng)
            add(kind, text, spans)
    return rows


def main() -> None:
    dev = build("dev", 20251101, {"pii": 420, "secret": 330, "injection": 300, "benign": 700, "tricky": 450})
    held = build("heldout", 777013, {"pii": 280, "secret": 220, "injection": 200, "benign": 450, "tricky": 300})
    blind = build("blind", 4242, {"pii": 250, "secret": 200, "injection": 216, "benign": 400, "tricky": 300})
    for name, rows in (("eval_dev.jsonl", dev), ("eval_heldout.jsonl", held), ("eval_blind.jsonl", blind)):
        with open(HERE / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} examples")


if __name__ == "__main__":
    main()
