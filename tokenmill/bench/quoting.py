"""Workloads whose answers quote their prompt: where speculative decoding by prompt lookup pays.

`tokenmill bench --task rewrite|extract|rag`: the same seeded passages for every target, asked
greedily (temperature 0, as apps ask for edits, extraction and grounded answers), each answer
ending where the model ends it (no ignore_eos: past its end a model writes text of its own).
"""

from __future__ import annotations

import random

TASKS = ("chat", "rewrite", "extract", "rag")

PASSAGES = (
    (
        "The lighthouse at Sandy Point was built in 1874 from granite quarried on the island. Its lamp "
        "burned whale oil until 1911, then paraffin, and since 1962 it has been electric. The tower is "
        "twenty-six metres tall and its light can be seen thirty kilometres out to sea. The keeper's "
        "cottage beside it is now a small museum that opens every summer from June to September."
    ),
    (
        "Maria Costa opened her bakery on Elm Street in March 2019 with two ovens and one employee. "
        "She bakes sourdough, rye and a sweet bread from her grandmother's recipe every morning at four. "
        "In 2023 the bakery moved to a larger shop on Market Square and now employs eleven people. "
        "It supplies bread to three schools and a hospital, and it is closed on Mondays."
    ),
    (
        "The committee met on 14 October in the town hall to discuss the new cycle path. The path will "
        "run for eight kilometres along the river, from the old mill to the railway station. Work will "
        "start in April and should finish before the end of the year. The cost, 2.4 million euros, will "
        "be shared between the town and the regional government."
    ),
    (
        "To reset the router, first unplug it from the power socket and wait thirty seconds. Then hold "
        "down the reset button on the back with a paperclip while you plug it in again. Keep holding the "
        "button for ten seconds, until the light on the front blinks orange. The router then restarts "
        "with its factory settings, and the default password is printed on the label underneath."
    ),
)

# the passages with spelling mistakes put in, for the rewrite task to correct
MISSPELLED = (
    ("built", "bilt"),
    ("electric", "electirc"),
    ("employee", "employe"),
    ("morning", "mornig"),
    ("discuss", "discus"),
    ("railway", "railwey"),
    ("socket", "sokcet"),
    ("button", "buton"),
    ("settings", "setings"),
    ("September", "Septembre"),
)

QUESTIONS = (
    "When was the lighthouse built, and how far can its light be seen?",
    "When did the bakery open, and where is it now?",
    "How long will the cycle path be, and who pays for it?",
    "How do I reset the router?",
)


def _misspelled(text: str) -> str:
    for right, wrong in MISSPELLED:
        text = text.replace(right, wrong)
    return text


def messages(task: str, rng: random.Random) -> list[dict[str, str]]:
    """A request's chat messages for `task` (one of TASKS but "chat"), its passage drawn by `rng`."""
    which = rng.randrange(len(PASSAGES))
    passage = PASSAGES[which]
    if task == "rewrite":
        return [
            {"role": "system", "content": "You are a careful copy editor."},
            {
                "role": "user",
                "content": "Rewrite the following text with its spelling mistakes corrected. Change nothing "
                f"else.\n\n{_misspelled(passage)}",
            },
        ]
    if task == "extract":
        return [
            {"role": "system", "content": "You extract information and answer with JSON only."},
            {
                "role": "user",
                "content": 'Return a JSON object with the keys "subject", "dates" (a list), "numbers" (a list) '
                'and "sentences" (a list of every sentence of the text, verbatim).\n\n'
                f"Text: {passage}",
            },
        ]
    if task == "rag":
        return [
            {
                "role": "system",
                "content": "Answer from the context only. Quote the sentences of the context that answer the "
                "question, word for word, then say which question they answer.",
            },
            {"role": "user", "content": f"Context:\n{passage}\n\nQuestion: {QUESTIONS[which]}"},
        ]
    raise ValueError(f"unknown quoting task {task!r}")
