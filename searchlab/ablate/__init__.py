"""`searchlab ablate`: the study's finalists and one-factor variants re-trained over paired seeds, with intervals and
a verdict per technique (command), and the verdict's view that the report leads with (view, handed to the report by
the commands)."""

from searchlab.ablate.command import ablate

__all__ = ["ablate"]
