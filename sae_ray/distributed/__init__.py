"""What every distributed piece shares: the Ray Train run (`trainer`), which rank this is and
the ranks acting as one (`ranks`), and how a model is spread over them (`sharding`)."""
