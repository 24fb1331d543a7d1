"""A trial's orchestration: its Train run and the reports Tune gets (`driver`), its cycles
(`cycle`), each stage as a shared artifact (`stages`, `sae_fit` with its co-trained peers in
`cofit`, `evaluation`), what it leaves in storage (`record`), a finished point replayed
(`replay`), how a trial ends (`outcome`) and the memory each stage needs (`memory`). The
science the stages call is `sae_ray.method`."""
