"""Writing the datastore during a forward pass: every scored row's key and target (--save-dstore)."""
from typing import Dict

from ..core.writer import DatastoreWriter
from .base import Component, Step


class DumpWriter(Component):
    def __init__(self, writer: DatastoreWriter, key_type: str):
        self.writer, self.key_types = writer, (key_type,)

    def on_scores(self, step: Step) -> None:
        if step.target is None:
            return  # nothing to store without the next token
        self.writer.add(step.keys(self.key_types[0]).float().cpu().numpy(), step.target.cpu().numpy())

    def close(self) -> Dict:
        manifest = self.writer.close()
        return {"rows": manifest["count"], "path": self.writer.path}
