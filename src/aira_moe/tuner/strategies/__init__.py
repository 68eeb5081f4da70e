"""The collaboration strategies (``cola_strategy``), one object each, and their registry: the one place, with the config
parser, that knows them by name. Adding a strategy: docs/method.md, "How to add a strategy"."""

from ...errors import UserError
from .base import CollaborationStrategy, TokenDependentUpdateError
from .fixed import FixedPairing, FullStrategy, HeuristicStrategy, RandomStrategy
from .routed import RoutedStrategy

STRATEGIES: dict[str, CollaborationStrategy] = {
    strategy.name: strategy for strategy in (FullStrategy(), HeuristicStrategy(), RandomStrategy(), RoutedStrategy())
}


def get_strategy(name: str) -> CollaborationStrategy:
    """The strategy object of ``cola_strategy`` = ``name``."""
    strategy = STRATEGIES.get(name)
    if strategy is None:
        raise UserError(f"`cola_strategy` must be one of {list(STRATEGIES)}, got {name!r}.")
    return strategy


__all__ = ["STRATEGIES", "CollaborationStrategy", "FixedPairing", "TokenDependentUpdateError", "get_strategy"]
