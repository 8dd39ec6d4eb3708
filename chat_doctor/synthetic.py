"""A synthetic sample in the HealthCareMagic schema (`instruction`, `input`, `output`).

Written by the project from templates and a fixed seed, so the pipeline runs with no dataset hub.
It is not medical advice and not real patient data. Regenerate with `python -m chat_doctor.synthetic`.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from chat_doctor.files import write_jsonl

DEFAULT_PATH = Path("data/raw/synthetic_healthcaremagic.jsonl")
INSTRUCTION = "If you are a doctor, please answer the medical questions based on the patient's description."

# (complaint, body area, likely cause, test to ask for, first-line advice, warning sign)
CONDITIONS = [
    (
        "a dry cough",
        "chest",
        "a viral upper respiratory infection",
        "a chest X-ray",
        "drink warm fluids, use steam inhalation and rest",
        "breathlessness or coughing blood",
    ),
    (
        "burning while passing urine",
        "lower abdomen",
        "a urinary tract infection",
        "a urine culture",
        "drink plenty of water and avoid holding urine",
        "fever with back pain",
    ),
    (
        "a throbbing headache",
        "head",
        "tension type headache or migraine",
        "a blood pressure check",
        "sleep regularly, limit screen time and take paracetamol when needed",
        "sudden severe headache or weakness",
    ),
    (
        "pain in the lower back",
        "back",
        "a muscle strain",
        "an X-ray of the lumbar spine",
        "apply hot packs, avoid lifting weights and do gentle stretching",
        "numbness in the legs",
    ),
    (
        "itchy red patches",
        "skin",
        "fungal infection or eczema",
        "a skin scraping test",
        "keep the area dry, wear cotton clothes and use a mild moisturiser",
        "spreading redness with fever",
    ),
    (
        "acidity and a burning feeling",
        "stomach",
        "gastritis or acid reflux",
        "an upper GI endoscopy",
        "eat small meals, avoid spicy food and do not lie down after eating",
        "black stools or vomiting blood",
    ),
    (
        "pain and swelling",
        "knee",
        "early osteoarthritis or a ligament sprain",
        "an MRI of the knee",
        "rest the joint, use ice packs and keep your weight in check",
        "a locked or unstable knee",
    ),
    (
        "irregular periods",
        "pelvis",
        "hormonal imbalance such as PCOS",
        "a pelvic ultrasound and hormone tests",
        "exercise regularly and keep a menstrual diary",
        "very heavy bleeding or fainting",
    ),
    (
        "a sore throat",
        "throat",
        "pharyngitis",
        "a throat swab",
        "gargle with warm salt water and drink warm fluids",
        "difficulty swallowing or breathing",
    ),
    (
        "dizziness on standing",
        "head",
        "low blood pressure or dehydration",
        "a blood count and blood pressure check",
        "drink enough fluids and stand up slowly",
        "fainting or chest pain",
    ),
    (
        "palpitations",
        "chest",
        "anxiety or a thyroid problem",
        "an ECG and thyroid function tests",
        "cut down on caffeine and practise relaxation",
        "chest pain or fainting",
    ),
    (
        "loose motions",
        "abdomen",
        "acute gastroenteritis",
        "a stool examination",
        "take oral rehydration solution and light food",
        "blood in stool or signs of dehydration",
    ),
    (
        "tingling in the fingers",
        "hand",
        "carpal tunnel syndrome or vitamin B12 deficiency",
        "nerve conduction studies and a B12 level",
        "avoid repetitive wrist strain and use a wrist splint at night",
        "weakness of the hand",
    ),
    (
        "a painful tooth",
        "jaw",
        "dental caries with pulp infection",
        "a dental X-ray",
        "rinse with warm salt water and see a dentist soon",
        "swelling of the face",
    ),
    (
        "hair fall",
        "scalp",
        "stress related telogen effluvium or iron deficiency",
        "a blood count and ferritin level",
        "eat a protein rich diet and use a mild shampoo",
        "patchy bald areas",
    ),
    (
        "a blocked nose",
        "nose",
        "allergic rhinitis or sinusitis",
        "an X-ray of the sinuses",
        "use saline nasal spray and avoid dust",
        "swelling around the eyes",
    ),
    (
        "fatigue",
        "whole body",
        "anaemia or low thyroid function",
        "a blood count and thyroid profile",
        "eat iron rich food and sleep well",
        "breathlessness on mild exertion",
    ),
    (
        "a painful ear",
        "ear",
        "an outer or middle ear infection",
        "an ear examination with an otoscope",
        "keep the ear dry and avoid cotton buds",
        "discharge with fever",
    ),
    (
        "pain in the heel",
        "foot",
        "plantar fasciitis",
        "an X-ray of the heel",
        "wear soft footwear and stretch the calf muscles",
        "pain at rest or swelling",
    ),
    (
        "a lump",
        "neck",
        "an enlarged lymph node from an infection",
        "an ultrasound of the neck",
        "watch its size for two weeks",
        "a lump that keeps growing or weight loss",
    ),
]
AGES = [19, 23, 27, 31, 34, 38, 42, 45, 49, 53, 58, 62, 67]
SEXES = ["male", "female"]
DURATIONS = ["two days", "a week", "ten days", "two weeks", "a month", "three months"]
OPENINGS = [
    "Hello doctor, I am a {age} year old {sex} and I have {complaint} in my {area} for {duration}.",
    "Hi, my {relative} is {age} years old and has {complaint} in the {area} since {duration}.",
    "I am {age} and I have had {complaint} in my {area} for {duration}.",
]
RELATIVES = ["mother", "father", "wife", "husband", "son", "daughter"]
DETAILS = [
    "It gets worse at night.",
    "It is worse in the morning.",
    "I took some medicine from the pharmacy but it did not help.",
    "There is no fever.",
    "I also feel tired most of the day.",
    "I have a history of diabetes.",
    "I am worried because it is not going away.",
]
QUESTIONS = ["What could this be?", "What should I do?", "Is this serious?", "Which test should I get done?"]
GREETINGS = ["Hi,", "Hello,", "Thanks for your query."]
CLOSINGS = ["Hope this helps.", "Take care.", "Wish you good health."]


def synthetic_row(rng: random.Random) -> dict[str, str]:
    complaint, area, cause, test, advice, warning = rng.choice(CONDITIONS)
    opening = rng.choice(OPENINGS).format(
        age=rng.choice(AGES),
        sex=rng.choice(SEXES),
        complaint=complaint,
        area=area,
        duration=rng.choice(DURATIONS),
        relative=rng.choice(RELATIVES),
    )
    query = " ".join([opening, *rng.sample(DETAILS, k=rng.randint(1, 3)), rng.choice(QUESTIONS)])
    answer = (
        f"{rng.choice(GREETINGS)} I have gone through your query. {complaint.capitalize()} in the {area} "
        f"is most likely due to {cause}. I suggest you get {test} done to confirm it. Meanwhile, {advice}. "
        f"If you notice {warning}, please see a doctor immediately. {rng.choice(CLOSINGS)}"
    )
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
