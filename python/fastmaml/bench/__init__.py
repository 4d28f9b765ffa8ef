"""Microbenchmarks: ``python -m fastmaml.bench`` runs the suite; each family is a module here."""

# family name -> module (inside fastmaml.bench) with a main(argv) entry point
FAMILIES = {
    "inner_update": "inner_update",
    "meta": "meta",
    "heads": "heads",
}
