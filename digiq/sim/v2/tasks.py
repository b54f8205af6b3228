"""The frozen task catalogue of benchmark v2 (docs/benchmark_v2.md says what and why).

FROZEN: once landed, the tasks, their goals and their splits never change (tests/test_sim_v2.py pins a hash).
Later work improves models, not the test.

Built by composition, in the AitW families (DigiRL's *general* and *web shopping* task sets,
https://github.com/DigiRL-agent/digirl): general goals (toggles, open an app, open a settings page; horizon 10)
and shopping goals (go to a site, search a query, select the k-th entry, add it to the cart; horizon 20).
Three disjoint splits: train, val and test. Val and test hold out (a) query words that never occur in
train (val words and test words), (b) (site, query) pairs of train words (:func:`shopping_split`),
(c) (toggle, value) pairs, apps and settings pages.
"""

from __future__ import annotations

import dataclasses
import functools

SITES: tuple[tuple[str, str], ...] = (
    # (app name on the home screen, the website the goal names); the first three are v1's shops.
    ("ShopMart", "shopmart.com"),
    ("BuyNow", "buynow.com"),
    ("DealHub", "dealhub.com"),
    ("CartZone", "cartzone.com"),
    ("PriceHive", "pricehive.com"),
    ("MegaBasket", "megabasket.com"),
)
# Home-screen apps: the six shops, then the device's own apps. App index = position here.
APPS: tuple[str, ...] = (*(name for name, _ in SITES), "Settings", "Browser", "Clock")
SETTINGS_APP, BROWSER_APP, CLOCK_APP = 6, 7, 8
# Toggles 0-3 sit on the main settings page; 4-6 each on its own sub-page (PAGES[i - 4]).
TOGGLES: tuple[str, ...] = (
    "wifi",
    "bluetooth",
    "airplane mode",
    "location",
    "dark mode",
    "vibration",
    "battery saver",
)
MAIN_TOGGLES = 4
PAGES: tuple[str, ...] = ("Display", "Sound", "Battery")
# Train words: v1's nine queries and eleven more. Every query has a word the pretraining stream cannot make
# (tests/test_sim_v2.py), so no v2 query is ever a stream phrase.
TRAIN_QUERIES: tuple[str, ...] = (
    "usb cable",
    "wireless mouse",
    "phone case",
    "desk lamp",
    "water bottle",
    "running shoes",
    "hdmi adapter",
    "yoga mat",
    "bluetooth speaker",
    "gaming keyboard",
    "office chair",
    "tea kettle",
    "wall clock",
    "bath towel",
    "power bank",
    "sun hat",
    "rain jacket",
    "toy robot",
    "photo frame",
    "cooking pot",
)
# Held-out words: they occur only in val goals (resp. only in test goals), and no word of them occurs in the
# pretraining stream.
VAL_QUERIES: tuple[str, ...] = (
    "garden hose",
    "coffee grinder",
    "laptop sleeve",
    "puzzle cube",
    "ceramic bowl",
)
TEST_QUERIES: tuple[str, ...] = (
    "hiking boots",
    "camping stove",
    "winter coat",
    "cycling helmet",
    "smart bulb",
)
ALL_QUERIES: tuple[str, ...] = (*TRAIN_QUERIES, *VAL_QUERIES, *TEST_QUERIES)
ORDINALS = ("first", "second", "third", "fourth")
NUM_ENTRIES = len(ORDINALS)  # select / add the 1st..4th entry (the 4th needs a scroll)
GENERAL_HORIZON = 10
SHOP_HORIZON = 20
SPLITS = ("train", "val", "test")
PREFIX = "v2/"

# Held-out general goals. Only toggles the pretraining stream never names are held out (its parse skill says
# "Turn on wifi" etc.); each held-out toggle is seen in train with the other value.
TOGGLE_SPLIT: dict[tuple[int, bool], str] = {(4, False): "val", (5, True): "test", (6, True): "test"}
APP_SPLIT: dict[int, str] = {1: "val", 4: "val", 5: "test", BROWSER_APP: "test"}
PAGE_SPLIT: dict[int, str] = {1: "val", 2: "test"}


@dataclasses.dataclass(frozen=True)
class TaskV2:
    """One v2 goal. ``kind`` picks the goal predicate (see :func:`digiq.sim.v2.device.is_goal`)."""

    task_id: str
    goal: str
    max_steps: int
    split: str
    kind: str  # "search" | "select" | "cart" | "toggle" | "open_app" | "open_page"
    shop: int = -1  # index into SITES (shopping)
    query: str = ""
    # The text any wrong typed text shows (another query of the same word group: train, val or test words),
    # so a train episode never shows a held-out word.
    decoy: str = ""
    item: int = 0  # which entry (0 = "the first entry")
    toggle: int = -1  # index into TOGGLES
    target: bool = False
    app: int = -1  # index into APPS (open_app)
    page: int = -1  # index into PAGES (open_page)

    @property
    def group(self) -> str:
        """The word group of the query (which words the episode may show): train, val or test."""
        if self.query in VAL_QUERIES:
            return "val"
        if self.query in TEST_QUERIES:
            return "test"
        return "train"


def _slug(text: str) -> str:
    return text.lower().replace(" ", "_").replace(".", "_")


def shopping_split(site: int, query_index: int) -> str:
    """The split of a (site, train-word query) pair: one pair in six for val, another one in six for test.

    Every train word and every site is seen in train, never together in a held-out pair (as v1's rule).
    """
    r = (site + query_index) % 6
    return "val" if r == 0 else "test" if r == 3 else "train"


def _shopping(site: int, query: str, decoy: str, split: str) -> list[TaskV2]:
    s = SITES[site][1]
    base = f'Go to {s}, search for "{query}"'
    where = f"{_slug(s)}/{_slug(query)}"
    out = [TaskV2(f"{PREFIX}{split}/search/{where}", base, SHOP_HORIZON, split, "search", site, query, decoy)]
    for k, ordinal in enumerate(ORDINALS):
        out.append(
            TaskV2(
                f"{PREFIX}{split}/select{k + 1}/{where}",
                f"{base}, and select the {ordinal} entry",
                SHOP_HORIZON,
                split,
                "select",
                site,
                query,
                decoy,
                item=k,
            )
        )
    for k, ordinal in enumerate(ORDINALS):
        out.append(
            TaskV2(
                f"{PREFIX}{split}/cart{k + 1}/{where}",
                f"{base}, select the {ordinal} entry, and add it to the cart",
                SHOP_HORIZON,
                split,
                "cart",
                site,
                query,
                decoy,
                item=k,
            )
        )
    return out


def _general(split: str, kind: str, name: str, goal: str, **goal_fields: int | bool) -> TaskV2:
    """A toggle / open_app / open_page task: id ``v2/<split>/<kind>/<name>``, the general horizon."""
    return TaskV2(f"{PREFIX}{split}/{kind}/{name}", goal, GENERAL_HORIZON, split, kind, **goal_fields)


def _decoy(group: tuple[str, ...], i: int) -> str:
    return group[(i + 1) % len(group)]


@functools.cache
def catalogue() -> dict[str, tuple[TaskV2, ...]]:
    """``{"train": (...), "val": (...), "test": (...)}``: deterministic, disjoint, frozen."""
    out: dict[str, list[TaskV2]] = {s: [] for s in SPLITS}
    for qi, query in enumerate(TRAIN_QUERIES):
        for si in range(len(SITES)):
            split = shopping_split(si, qi)
            out[split] += _shopping(si, query, _decoy(TRAIN_QUERIES, qi), split)
    for split, group in (("val", VAL_QUERIES), ("test", TEST_QUERIES)):
        for qi, query in enumerate(group):
            for si in range(len(SITES)):
                out[split] += _shopping(si, query, _decoy(group, qi), split)
    for ti, name in enumerate(TOGGLES):
        for target in (True, False):
            split = TOGGLE_SPLIT.get((ti, target), "train")
            value = "on" if target else "off"
            goal = f"Turn {value} {name}"
            out[split].append(
                _general(split, "toggle", f"{_slug(name)}/{value}", goal, toggle=ti, target=target)
            )
    for ai, name in enumerate(APPS):
        split = APP_SPLIT.get(ai, "train")
        out[split].append(_general(split, "open_app", _slug(name), f"Open the {name} app", app=ai))
    for pi, name in enumerate(PAGES):
        split = PAGE_SPLIT.get(pi, "train")
        out[split].append(_general(split, "open_page", _slug(name), f"Open the {name} settings", page=pi))
    return {s: tuple(ts) for s, ts in out.items()}


@functools.cache
def task_index() -> dict[str, TaskV2]:
    return {t.task_id: t for split in catalogue().values() for t in split}


def query_pool(task: TaskV2) -> tuple[str, ...]:
    """The queries an episode of ``task`` may show or a demonstrator may mistype: the train words plus the
    task's own held-out group (a train episode never carries a val or test word)."""
    group = task.group
    return TRAIN_QUERIES + (VAL_QUERIES if group == "val" else TEST_QUERIES if group == "test" else ())
