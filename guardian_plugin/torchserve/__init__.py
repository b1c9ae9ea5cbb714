"""TorchServe tooling around the handlers: an HTTP query target that lets the attacks talk to a served
model. The local TorchServe launcher for tests and demos is guardian_plugin.devserver.torchserve."""
