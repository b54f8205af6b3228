"""The fixed task catalogue of the simulated device: AitW-style goals with disjoint train / test splits.

Two families, as in AitW and the DigiRL task sets (https://github.com/DigiRL-agent/digirl): *general* device
tasks ("Turn on wifi", "Open the settings"; horizon 10, the DigiRL general horizon) and *web shopping* tasks
("Go to shopmart.com, search for \"usb cable\", and select the first entry"; horizon 20, the DigiRL webshop
horizon). The catalogue is a pure function of this module (no seed), so a ``task_id`` names the same task in
every process.

Splits are disjoint by task: the test split holds out one (shop, query) pair in three (every shop and query
is seen in training, never together: see :func:`shopping_split`) and other toggle goals / apps, so a test
success is generalisation rather than recall.
"""

from __future__ import annotations

import dataclasses
import functools

SHOPS: tuple[tuple[str, str], ...] = (
    # (app name on the home screen, the website the AitW-style goal names)
    ("ShopMart", "shopmart.com"),
    ("BuyNow", "buynow.com"),
    ("DealHub", "dealhub.com"),
)
TOGGLES: tuple[str, ...] = ("wifi", "bluetooth", "airplane mode")
TRAIN_QUERIES = ("usb cable", "wireless mouse", "phone case", "desk lamp", "water bottle", "running shoes")
TEST_QUERIES = ("hdmi adapter", "yoga mat", "bluetooth speaker")
GENERAL_HORIZON = 10
SHOP_HORIZON = 20


@dataclasses.dataclass(frozen=True)
class Task:
    """One goal. ``kind`` picks the goal predicate (see ``SimPhone.is_goal``)."""

    task_id: str
    goal: str
    max_steps: int
    split: str
    # "search" | "select" | "cart" (shopping); "toggle" | "open_settings" | "open_shop" | "open_browser"
    kind: str
    shop: int = -1  # index into SHOPS for shopping / open_shop tasks
    query: str = ""  # the search query the goal asks for ("" for general tasks)
    # The text a *wrong* query shows on screen (any typed text that is not ``query`` renders as this one
    # so that the state graph stays finite; it is another query of the same split).
    decoy: str = ""
    item: int = 0  # which result to select / add to cart (0 = "the first entry")
    toggle: int = -1  # index into TOGGLES for toggle tasks
    target: bool = False  # the toggle value the goal asks for
    # Toggle values at reset (wifi, bluetooth, airplane mode); the goal never holds at reset.
    initial_toggles: tuple[bool, bool, bool] = (True, False, False)


def _slug(text: str) -> str:
    return text.replace(" ", "_").replace(".", "_")


ALL_QUERIES = (*TRAIN_QUERIES, *TEST_QUERIES)


def shopping_split(shop: int, query_index: int) -> str:
    """Which split a (shop, query) pair belongs to: one pair in three is held out for test.

    A compositional split: every query and every shop appears in training, but the test pairs never do. A
    tiny policy trained on a handful of queries cannot type a query it has never seen (it has no pretrained
    language model to copy with), so unseen *strings* would measure nothing; unseen *combinations* still
    require reading the goal (which shop, which query) rather than recalling a task.
    """
    return "test" if (shop + query_index) % 3 == 0 else "train"


def _shopping(split: str, queries: tuple[str, ...]) -> list[Task]:
    tasks = []
    for qi, query in enumerate(queries):
        decoy = queries[(qi + 1) % len(queries)]
        for si, (_, site) in enumerate(SHOPS):
            if shopping_split(si, qi) != split:
                continue
            base = f'Go to {site}, search for "{query}"'
            tasks.append(
                Task(
                    f"{split}/search/{_slug(site)}/{_slug(query)}",
                    base,
                    SHOP_HORIZON,
                    split,
                    "search",
                    si,
                    query,
                    decoy,
                )
            )
            tasks.append(
                Task(
                    f"{split}/select/{_slug(site)}/{_slug(query)}",
                    f"{base}, and select the first entry",
                    SHOP_HORIZON,
                    split,
                    "select",
                    si,
                    query,
                    decoy,
                )
            )
            tasks.append(
                Task(
                    f"{split}/cart/{_slug(site)}/{_slug(query)}",
                    f"{base}, select the first entry, and add it to the cart",
                    SHOP_HORIZON,
                    split,
                    "cart",
                    si,
                    query,
                    decoy,
                )
            )
    return tasks


def _toggle_task(split: str, toggle: int, target: bool, initial: tuple[bool, bool, bool]) -> Task:
    name = TOGGLES[toggle]
    goal = f"Turn {'on' if target else 'off'} {name}"
    init = list(initial)
    init[toggle] = not target  # the goal must not hold at reset
    return Task(
        f"{split}/toggle/{_slug(name)}/{'on' if target else 'off'}",
        goal,
        GENERAL_HORIZON,
        split,
        "toggle",
        toggle=toggle,
        target=target,
        initial_toggles=tuple(init),  # type: ignore[arg-type]
    )


@functools.cache
def catalogue() -> dict[str, tuple[Task, ...]]:
    """``{"train": (...), "test": (...)}``; deterministic and disjoint."""
    train: list[Task] = _shopping("train", ALL_QUERIES)
    test: list[Task] = _shopping("test", ALL_QUERIES)
    # General tasks: train turns wifi on / bluetooth off / airplane mode on; test asks the opposite values
    # (different goal strings and different start screens' status bars).
    train += [
        _toggle_task("train", 0, True, (False, True, False)),
        _toggle_task("train", 1, False, (True, True, False)),
        _toggle_task("train", 2, True, (True, False, False)),
        _toggle_task("train", 1, True, (False, False, False)),
        Task("train/open_settings", "Open the settings", GENERAL_HORIZON, "train", "open_settings"),
        Task(
            "train/open_shop/shopmart_com", "Open the ShopMart app", GENERAL_HORIZON, "train", "open_shop", 0
        ),
        Task("train/open_shop/buynow_com", "Open the BuyNow app", GENERAL_HORIZON, "train", "open_shop", 1),
    ]
    test += [
        _toggle_task("test", 0, False, (True, False, False)),
        _toggle_task("test", 2, False, (False, False, True)),
        Task(
            "test/open_settings",
            "Open the settings app",
            GENERAL_HORIZON,
            "test",
            "open_settings",
            initial_toggles=(False, True, False),
        ),
        Task("test/open_shop/dealhub_com", "Open the DealHub app", GENERAL_HORIZON, "test", "open_shop", 2),
        Task("test/open_browser", "Open the web browser", GENERAL_HORIZON, "test", "open_browser"),
    ]
    return {"train": tuple(train), "test": tuple(test)}


@functools.cache
def task_index() -> dict[str, Task]:
    return {t.task_id: t for split in catalogue().values() for t in split}
