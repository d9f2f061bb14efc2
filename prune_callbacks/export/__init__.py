"""What a pruned model becomes when it leaves training: a slim model (structured units cut out, config
rewritten: :mod:`.slim`, :mod:`.slim_pruned`), low-rank factors (:mod:`.low_rank`), a compressed sparse
checkpoint (:mod:`.sparse_io`), semi-structured 2:4 tensors (:mod:`.semi_structured`). `export_pruned`
dispatches on the name each granularity gives in ``export_as`` (:mod:`.dispatch`). A new export format goes
here and registers itself with `register_export`."""

from prune_callbacks.export.dispatch import EXPORTS, export_pruned, register_export
from prune_callbacks.export.slim import slim
from prune_callbacks.export.slim_pruned import slim_pruned, structured_keep

__all__ = ["EXPORTS", "export_pruned", "register_export", "slim", "slim_pruned", "structured_keep"]
