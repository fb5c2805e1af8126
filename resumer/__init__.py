"""resumer: resumable, checkpointed transfers of container image layers."""
