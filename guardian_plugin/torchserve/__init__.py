"""TorchServe tooling around the handlers: a local server for tests and demos, and an HTTP query
target that lets the attacks talk to a served model."""
