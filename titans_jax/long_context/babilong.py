"""bAbI-style stories for BABILong QA1-QA5, from a seeded simulator that tracks the world state.

bAbI itself ships nowhere reachable, so the stories are generated: people move between places,
pick up, drop and give objects; the simulator keeps who is where and who holds what, and the
question is asked of that state, so every answer is correct by construction. Sentence templates
follow bAbI's ("Mary moved to the bathroom.", "John picked up the football.", "The office is north
of the bedroom.", "Mary gave the cake to Fred.").

    qa1  single supporting fact     Where is <person>?                       -> place
    qa2  two supporting facts       Where is the <object>?                   -> place
    qa3  three supporting facts     Where was the <object> before the <place>? -> place
    qa4  two-argument relations     What is <dir> of the <place>? / What is the <place> <dir> of?
    qa5  three-argument relations   Who gave the <o> to <p>? / Who did <p> give the <o> to? /
                                    What did <p> give to <q>? / Who received the <o>? /
                                    Who gave the <o>?                        -> person / object

Every question is unambiguous: the generator only asks what the story determines uniquely (qa2:
the object's place needs a move after the pick-up or drop; qa3: the place named in the question
occurs once in the object's history; qa5: the asked-for argument is the same in every matching
give event). `generate_story(task, rng)` returns a `Story`; `BABILONG_PROMPTS` holds the per-task
instruction, examples and post-prompt, `format_prompt` the BABILong layout.
"""

from __future__ import annotations

import dataclasses
import random

PEOPLE = ("Mary", "John", "Daniel", "Sandra", "Fred", "Bill", "Jeff", "Julie")
PLACES = ("bathroom", "hallway", "kitchen", "garden", "office", "bedroom")
OBJECTS = ("football", "apple", "milk", "cake")
DIRECTIONS = ("north", "south", "east", "west")

MOVE_VERBS = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
TAKE_VERBS = ("picked up", "got", "grabbed", "took")
DROP_VERBS = ("dropped", "discarded", "put down", "left")
GIVE_VERBS = ("gave", "handed", "passed")

QA_TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")

# Number of story sentences (facts, with distractors) per task: drawn uniformly in [lo, hi].
STORY_SENTENCES = {"qa1": (4, 10), "qa2": (6, 14), "qa3": (8, 16), "qa4": (2, 2), "qa5": (6, 14)}


@dataclasses.dataclass(frozen=True)
class Story:
    task: str
    facts: tuple[str, ...]
    question: str
    answer: str


class World:
    """People, places and objects; each event is applied to the state and returns its sentence."""

    def __init__(self, rng: random.Random, people: tuple[str, ...] = PEOPLE,
                 objects: tuple[str, ...] = OBJECTS):
        self.rng = rng
        self.people = people
        self.objects = objects
        self.location: dict[str, str] = {}           # person -> place (once known)
        self.holder: dict[str, str] = {}             # object -> person holding it
        self.object_place: dict[str, str] = {}       # object -> place where it lies (not held)
        self.history: dict[str, list[str]] = {}      # object -> distinct consecutive places
        self.moved_since_taken: dict[str, bool] = {} # object -> its place needed a later move
        self.gives: list[tuple[str, str, str]] = []  # (giver, object, receiver)

    def where_object(self, obj: str) -> str | None:
        if obj in self.holder:
            return self.location[self.holder[obj]]
        return self.object_place.get(obj)

    def _note_place(self, obj: str) -> None:
        place = self.where_object(obj)
        history = self.history.setdefault(obj, [])
        if place is not None and (not history or history[-1] != place):
            history.append(place)

    def move(self, person: str, place: str) -> str:
        self.location[person] = place
        for obj, holder in self.holder.items():
            if holder == person:
                self.moved_since_taken[obj] = True
                self._note_place(obj)
        return f"{person} {self.rng.choice(MOVE_VERBS)} the {place}."

    def take(self, person: str, obj: str) -> str:
        assert person in self.location and obj not in self.holder
        assert self.object_place.get(obj, self.location[person]) == self.location[person]
        self.holder[obj] = person
        self.object_place.pop(obj, None)
        self.moved_since_taken[obj] = False
        self._note_place(obj)
        return f"{person} {self.rng.choice(TAKE_VERBS)} the {obj}."

    def drop(self, person: str, obj: str) -> str:
        assert self.holder.get(obj) == person
        del self.holder[obj]
        self.object_place[obj] = self.location[person]
        return f"{person} {self.rng.choice(DROP_VERBS)} the {obj}."

    def give(self, giver: str, obj: str, receiver: str) -> str:
        assert self.holder.get(obj) == giver and giver != receiver
        assert self.location.get(receiver) == self.location[giver]
        self.holder[obj] = receiver
        self.gives.append((giver, obj, receiver))
        return f"{giver} {self.rng.choice(GIVE_VERBS)} the {obj} to {receiver}."

    # -- random events ---------------------------------------------------------------------

    def random_move(self, people=None) -> str:
        person = self.rng.choice(people or self.people)
        places = [p for p in PLACES if p != self.location.get(person)]
        return self.move(person, self.rng.choice(places))

    def random_object_event(self) -> str:
        """A take or a drop that the state allows, else a move."""
        options = []
        for person, place in self.location.items():
            for obj in self.objects:
                if obj in self.holder:
                    if self.holder[obj] == person:
                        options.append(("drop", person, obj))
                elif self.object_place.get(obj, place) == place:
                    options.append(("take", person, obj))
        if not options:
            return self.random_move()
        kind, person, obj = self.rng.choice(sorted(options))
        return self.take(person, obj) if kind == "take" else self.drop(person, obj)

    def random_give(self) -> str:
        """Someone holding an object gives it to another person, who first walks over if needed."""
        held = sorted(self.holder.items())
        if not held:
            return self.random_object_event()
        obj, giver = self.rng.choice(held)
        receiver = self.rng.choice([p for p in self.people if p != giver])
        if self.location.get(receiver) != self.location[giver]:
            return self.move(receiver, self.location[giver])
        return self.give(giver, obj, receiver)


def _qa1(rng: random.Random) -> Story:
    world = World(rng, people=PEOPLE[:4])
    lo, hi = STORY_SENTENCES["qa1"]
    facts = [world.random_move() for _ in range(rng.randint(lo, hi))]
    person = rng.choice(sorted(world.location))
    return Story("qa1", tuple(facts), f"Where is {person}?", world.location[person])


def _object_story(task: str, rng: random.Random, people=PEOPLE[:4]) -> tuple[World, list[str]]:
    world = World(rng, people=people, objects=OBJECTS[:3])
    lo, hi = STORY_SENTENCES[task]
    facts = [world.random_move() for _ in range(2)]
    for _ in range(rng.randint(lo, hi) - 2):
        kind = rng.random()
        if task == "qa5":
            facts.append(world.random_give() if kind < 0.45 else
                         world.random_object_event() if kind < 0.7 else world.random_move())
        else:
            facts.append(world.random_object_event() if kind < 0.45 else world.random_move())
    return world, facts


def _qa2(rng: random.Random) -> Story:
    while True:
        world, facts = _object_story("qa2", rng)
        objs = sorted(o for o in world.objects
                      if world.where_object(o) is not None and world.moved_since_taken.get(o))
        if objs:
            obj = rng.choice(objs)
            return Story("qa2", tuple(facts), f"Where is the {obj}?", world.where_object(obj))


def _qa3(rng: random.Random) -> Story:
    while True:
        world, facts = _object_story("qa3", rng)
        candidates = [(obj, i) for obj in world.objects
                      for i, place in enumerate(world.history.get(obj, []))
                      if i >= 1 and world.history[obj].count(place) == 1]
        if candidates:
            obj, i = rng.choice(sorted(candidates))
            history = world.history[obj]
            return Story("qa3", tuple(facts), f"Where was the {obj} before the {history[i]}?",
                         history[i - 1])


def _qa4(rng: random.Random) -> Story:
    a, b, c = rng.sample(PLACES, 3)
    direction = rng.choice(DIRECTIONS)
    facts = [f"The {a} is {direction} of the {b}.", f"The {b} is {direction} of the {c}."]
    rng.shuffle(facts)
    kind = rng.randrange(4)
    question, answer = [
        (f"What is {direction} of the {b}?", a), (f"What is the {b} {direction} of?", c),
        (f"What is {direction} of the {c}?", b), (f"What is the {a} {direction} of?", b),
    ][kind]
    return Story("qa4", tuple(facts), question, answer)


def _qa5(rng: random.Random) -> Story:
    while True:
        world, facts = _object_story("qa5", rng, people=PEOPLE[:5])
        if not world.gives:
            continue
        giver, obj, receiver = rng.choice(world.gives)
        questions = []
        if len({g for g, o, r in world.gives if o == obj and r == receiver}) == 1:
            questions.append((f"Who gave the {obj} to {receiver}?", giver))
        if len({r for g, o, r in world.gives if g == giver and o == obj}) == 1:
            questions.append((f"Who did {giver} give the {obj} to?", receiver))
        if len({o for g, o, r in world.gives if g == giver and r == receiver}) == 1:
            questions.append((f"What did {giver} give to {receiver}?", obj))
        if len({r for g, o, r in world.gives if o == obj}) == 1:
            questions.append((f"Who received the {obj}?", receiver))
        if len({g for g, o, r in world.gives if o == obj}) == 1:
            questions.append((f"Who gave the {obj}?", giver))
        if questions:
            question, answer = rng.choice(questions)
            return Story("qa5", tuple(facts), question, answer)


_GENERATORS = {"qa1": _qa1, "qa2": _qa2, "qa3": _qa3, "qa4": _qa4, "qa5": _qa5}


def generate_story(task: str, rng: random.Random) -> Story:
    """A seeded bAbI-like story for qa1..qa5 (its answer follows from the simulated state)."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown bAbI task {task!r}; expected one of {QA_TASKS}")
    return _GENERATORS[task](rng)


# --- BABILong prompts ---------------------------------------------------------------------------

BABILONG_TEMPLATE = "{instruction}\n{examples}\n{post_prompt}\n<context>\n{context}\n</context>\nQuestion: {question}"

_COMMON = ("I will give you a context with facts hidden in some unrelated text, and a question. "
           "Answer the question using only the facts. ")

BABILONG_PROMPTS = {
    "qa1": {
        "instruction": _COMMON + "The facts say where people went. If a person was in several "
                       "places, the latest place counts.",
        "examples": "<example>\nCharlie went to the hallway. Judith went back to the kitchen. "
                    "Charlie travelled to the balcony. Where is Charlie?\nAnswer: The answer is "
                    "balcony.\n</example>",
        "post_prompt": "Answer with one word, the place, in the form: The answer is <place>.",
    },
    "qa2": {
        "instruction": _COMMON + "The facts say where people went and which objects they picked "
                       "up or dropped. An object that someone carries is where that person is.",
        "examples": "<example>\nAlan got the pencil. Alan went to the porch. Where is the pencil?"
                    "\nAnswer: The answer is porch.\n</example>",
        "post_prompt": "Answer with one word, the place, in the form: The answer is <place>.",
    },
    "qa3": {
        "instruction": _COMMON + "The facts say where people went and which objects they picked "
                       "up or dropped. An object that someone carries is where that person is. "
                       "Name the place the object was in just before the place in the question.",
        "examples": "<example>\nAlan got the pencil. Alan went to the porch. Alan went to the "
                    "attic. Where was the pencil before the attic?\nAnswer: The answer is porch."
                    "\n</example>",
        "post_prompt": "Answer with one word, the place, in the form: The answer is <place>.",
    },
    "qa4": {
        "instruction": _COMMON + "The facts say how places lie relative to each other.",
        "examples": "<example>\nThe porch is east of the attic. The attic is east of the cellar. "
                    "What is east of the attic?\nAnswer: The answer is porch.\n</example>",
        "post_prompt": "Answer with one word, the place, in the form: The answer is <place>.",
    },
    "qa5": {
        "instruction": _COMMON + "The facts say where people went, which objects they picked up "
                       "or dropped, and who gave which object to whom.",
        "examples": "<example>\nAlan got the pencil. Alan gave the pencil to Rita. Who did Alan "
                    "give the pencil to?\nAnswer: The answer is Rita.\n</example>",
        "post_prompt": "Answer with one word, a person or an object, in the form: The answer is "
                       "<word>.",
    },
}


def format_prompt(task: str, context: str, question: str, examples: bool = False) -> str:
    """BABILong's layout with this project's per-task instruction (examples optional)."""
    parts = BABILONG_PROMPTS[task]
    return BABILONG_TEMPLATE.format(
        instruction=parts["instruction"], examples=parts["examples"] if examples else "",
        post_prompt=parts["post_prompt"], context=context, question=question)


__all__ = [
    "BABILONG_PROMPTS", "BABILONG_TEMPLATE", "DIRECTIONS", "OBJECTS", "PEOPLE", "PLACES",
    "QA_TASKS", "Story", "World", "format_prompt", "generate_story",
]
