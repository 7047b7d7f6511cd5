"""The engine: scheduler, runner, sampler."""
