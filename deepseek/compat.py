"""Names the seed programs used, kept here (and only here) so that they run unchanged.

    from deepseek.compat import DeepseekServing
    DeepseekServing(model, port=8080).start()      # today: ds.Server(model, port=8080).start()

New code uses the names on the right; nothing in the framework imports this module.
"""

from deepseek.serve.server import Server as DeepseekServing

__all__ = ["DeepseekServing"]
