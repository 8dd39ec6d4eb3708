"""A synthetic sample in the HealthCareMagic schema (`instruction`, `input`, `output`).

Written by the project from templates and a fixed seed, so the pipeline runs with no dataset hub.
It is not medical advice and not real patient data. Regenerate with `python -m chat_doctor.data.synthetic`.
"""

from __future__ import annotations

import argparse
import csv
import random
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from chat_doctor.core.files import write_jsonl

DEFAULT_PATH = Path("data/raw/synthetic_healthcaremagic.jsonl")
INSTRUCTION = "If you are a doctor, please answer the medical questions based on the patient's description."


class Condition(NamedTuple):
    complaint: str
    area: str
    cause: str
    test: str
    advice: str
    warning: str
    medicine: str
    specialist: str


CONDITIONS_FILE = Path(__file__).with_name("synthetic_conditions.csv")  # one row per condition


@lru_cache(maxsize=1)
def conditions() -> tuple[Condition, ...]:
    with open(CONDITIONS_FILE, newline="", encoding="utf-8") as fh:
        return tuple(Condition(**row) for row in csv.DictReader(fh))


AGES = [19, 23, 27, 31, 34, 38, 42, 45, 49, 53, 58, 62, 67]
SEXES = ["male", "female"]
DURATIONS = ["two days", "a week", "ten days", "two weeks", "a month", "three months"]
RELATIVES = ["mother", "father", "wife", "husband", "son", "daughter"]
OPENINGS = [
    "Hello doctor, I am a {age} year old {sex} and I have {complaint} in my {area} for {duration}.",
    "Hi, my {relative} is {age} years old and has {complaint} in the {area} since {duration}.",
    "I am {age} and I have had {complaint} in my {area} for {duration}.",
    "hi doctor i am {age} yrs {sex}, having {complaint} in {area} for {duration}.",
    "Sir, I have been suffering from {complaint} in my {area} for {duration}.",
    "My {relative} ({age}) has been complaining of {complaint} in the {area} for about {duration}.",
]
DETAILS = [
    "It gets worse at night.",
    "It is worse in the morning.",
    "I took some medicine from the pharmacy but it did not help.",
    "There is no fever.",
    "I also feel tired most of the day.",
    "I have a history of diabetes.",
    "I am worried because it is not going away.",
    "I had the same problem last year and it went away on its own.",
    "I work long hours at a desk and do not get much sleep.",
    "My blood pressure is normal and I do not smoke.",
    "I saw a local doctor who gave me some tablets, I do not remember the name.",
    "It started after I travelled last month.",
    "Sometimes it is mild and sometimes it is very bad.",
]
QUESTIONS = [
    "What could this be?",
    "What should I do?",
    "Is this serious?",
    "Which test should I get done?",
    "Please advise.",
    "Do I need to see a specialist?",
    "Can this be treated at home?",
]

# An answer is a greeting, an acknowledgement, then some of the sections below in a doctor's usual
# order, then a closing: real HealthCareMagic answers vary their frame and run ~60-120 words.
GREETINGS = [
    "Hi,",
    "Hello,",
    "Thanks for your query.",
    "Hi, thanks for your query.",
    "Hello, welcome to Chat Doctor.",
    "Hi and welcome.",
    "Hello and thank you for asking.",
]
ACKNOWLEDGEMENTS = [
    "I have gone through your query.",
    "I understand your concern.",
    "I have read your question carefully.",
    "I can understand how worrying this is.",
    "",
]
CAUSES = [
    "{Complaint} in the {area} is most likely due to {cause}.",
    "From what you describe, this looks like {cause}.",
    "The symptoms you mention point towards {cause}.",
    "With {complaint} for {duration}, the commonest cause is {cause}.",
]
TESTS = [
    "I suggest you get {test} done to confirm it.",
    "Please get {test} done so that the cause is confirmed.",
    "To be sure, {test} should be done.",
]
TREATMENTS = [
    "You can take {medicine}.",
    "Your doctor may prescribe {medicine}.",
    "For relief, {medicine} usually helps.",
]
ADVICE = ["Meanwhile, {advice}.", "In the meantime, {advice}.", "At home, {advice}."]
WARNINGS = [
    "If you notice {warning}, please see a doctor immediately.",
    "Watch for {warning}; if it happens, go to the emergency room.",
    "Do not ignore {warning}, that needs an urgent check.",
]
REFERRALS = [
    "If it does not settle in a week, consult {specialist}.",
    "It is better to consult {specialist} for a proper examination.",
    "Please follow up with {specialist} with the reports.",
]
CLOSINGS = [
    "Hope this helps.",
    "Take care.",
    "Wish you good health.",
    "Hope I have answered your query. Let me know if I can assist you further.",
    "Wish you good health. Thanks.",
    "Hope this helps. Take care.",
    "Regards.",
]


def synthetic_row(rng: random.Random) -> dict[str, str]:
    condition = rng.choice(conditions())
    slots = {
        **condition._asdict(),
        "Complaint": condition.complaint.capitalize(),
        "age": rng.choice(AGES),
        "sex": rng.choice(SEXES),
        "duration": rng.choice(DURATIONS),
        "relative": rng.choice(RELATIVES),
    }
    query = " ".join(
        [
            rng.choice(OPENINGS).format(**slots),
            *rng.sample(DETAILS, k=rng.randint(1, 4)),
            *rng.sample(QUESTIONS, k=rng.randint(1, 2)),
        ]
    )
    sections = [CAUSES, TESTS, TREATMENTS, ADVICE, WARNINGS, REFERRALS]
    keep = [CAUSES, *(s for s in sections[1:] if rng.random() < 0.7)]
    sentences = [rng.choice(GREETINGS), rng.choice(ACKNOWLEDGEMENTS)]
    sentences += [rng.choice(section).format(**slots) for section in keep]
    sentences.append(rng.choice(CLOSINGS))
    answer = " ".join(s for s in sentences if s)
    return {"instruction": INSTRUCTION, "input": query, "output": answer}


def generate(rows: int = 400, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [synthetic_row(rng) for _ in range(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args()
    write_jsonl(args.out, generate(args.rows, args.seed))
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
