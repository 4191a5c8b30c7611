"""Self-supervised pretraining of the project's small foundation model (:mod:`.loop`, split by concern next)."""
