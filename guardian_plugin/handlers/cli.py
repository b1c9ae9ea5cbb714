"""`guardian protect`: guard an existing TorchServe model archive without touching its code;
`guardian handler-file NAME`: the path of a shipped handler file for torch-model-archiver's --handler."""

from __future__ import annotations

import sys


def _protect(args) -> int:
    from guardian_plugin.handlers.archive import protect

    s = protect(args.archive, args.detector, args.output, config=args.config, ledger=args.ledger,
                namespace=args.namespace, output=args.model_output, max_image_pixels=args.max_image_pixels,
                allow_mismatch=args.allow_mismatch, input_fit=args.input_fit, calibrate=args.calibrate,
                calibrate_crops=args.calibrate_crops)
    print(f"wrote {s['archive']}: model {s['model']}, handler {s['handler']} wrapping {s['wraps']!r}; "
          f"ledger {s['ledger']} (relative paths: under $GUARDIAN_STATE_DIR), namespace {s['namespace']}; "
          f"{s['fit']}; detector input fit {s['input_fit']}" + (f" (MISMATCH, allowed: {'; '.join(s['mismatch'])})" if s["mismatch"] else ""))
    print(f"to serve it with batching, start TorchServe with `--models {s['models_arg']}` and put this line in its "
          "config.properties (edit the numbers; the key must be the model name it is served under, "
          f"{s['model']!r}: TorchServe silently ignores an entry under any other name, the file name say, and "
          "then runs the model with batch size 1):")
    print(s["models_line"])
    print("gRPC: TorchServe passes no gRPC metadata to the model, so the guarded model answers every gRPC "
          "prediction with the error GrpcNotServed; TorchServe 0.12 cannot turn its gRPC ports off: keep "
          "grpc_inference_address and grpc_management_address at 127.0.0.1 (the default) in config.properties and "
          "expose only the HTTP inference port (docs/torchserve.md, gRPC)")
    if s["calibration"]:
        from guardian_plugin.recalibrate import summary

        print(summary(s["calibration"], "the archive's own preprocess"))
    print(f"distribution test: {s['distribution']}")
    print(s["trained_against"])
    if s["label_only"]:
        print(f"WARNING: {s['label_only']}", file=sys.stderr)
    return 0


def _handler_file(args) -> int:
    from guardian_plugin.handlers.files import handler_file

    print(handler_file(args.name))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "protect", help="guard an existing TorchServe .mar (handler wrapped, detector embedded)",
        description="Rewrite a TorchServe model archive so that its own handler runs behind Model-Guardian: "
                    "the manifest's handler becomes guardian_plugin.handlers.GuardedHandler, the original "
                    "handler is kept and delegated to, and the detector artifact and guard settings are "
                    "embedded (model-config.yaml, `handler: guardian:`). The archive's model is probed first: "
                    "a detector trained for other inputs or another class count is refused (exit 2).")
    p.add_argument("archive", help="the .mar to protect (zip format, as torch-model-archiver writes it)")
    p.add_argument("--detector", required=True, help="detector artifact directory (detector.yaml + weights)")
    p.add_argument("--config", help="guard settings YAML (ledger, namespace, rule, response, identity); "
                                    "its `detector:` key is replaced by the embedded artifact")
    p.add_argument("-o", "--output", required=True, help="the protected .mar to write")
    p.add_argument("--ledger", help="ledger URI, overriding the config (e.g. sqlite:///var/lib/guardian/ledger.db)")
    p.add_argument("--namespace", help="ledger namespace (default: the config's, else the archive's model name)")
    p.add_argument("--model-output", choices=["auto", "logits", "probabilities"], default="auto",
                   help="what the original handler's inference returns (default: detected per batch)")
    p.add_argument("--max-image-pixels", type=int, help="answer larger images with 400 before decoding them")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="guard the model even if the detector was trained for other inputs or another class count "
                        "(checked by probing the archive's model; see docs/detector.md); the workers log a warning")
    from guardian_plugin.detector import INPUT_FITS

    p.add_argument("--input-fit", choices=INPUT_FITS,
                   help="how the model's preprocessed input is brought to the detector's size, replacing the "
                        "artifact's `input.fit` in the embedded copy (e.g. area: TorchServe's image_classifier "
                        "handler gives 224 px tensors, a CIFAR-10 detector reads 32 px; default: the artifact's)")
    p.add_argument("--calibrate", metavar="DIR",
                   help="re-set the embedded detector's thresholds on the served path: the benign images in DIR "
                        "(files as clients send them; at least 2/target FPR, e.g. 200 at 1%%) through the "
                        "archive's own preprocess and the input fit, at the artifact's target FPR, every other "
                        "image held out to report the benign flagged share before and after; for a handler whose "
                        "resizing differs from the detector's training images (docs/torchserve.md); the "
                        "distribution test's reference (when the artifact has one) is rebuilt on the same path "
                        "with the archive's own inference, so the test applies behind a resizing handler too")
    p.add_argument("--calibrate-crops", type=int, default=1, metavar="N",
                   help="with fewer benign images than 2/target FPR: N uploads per file in DIR (the file and N - 1 "
                        "random crops of it, as PNG; e.g. 40 photos x 5 = 200), every crop of a file in the same "
                        "half so the held-out share is measured on other files (default 1: the files only)")
    p.set_defaults(func=_protect)

    from guardian_plugin.handlers.files import FILES

    h = subparsers.add_parser(
        "handler-file", help="print the path of a guarded handler file for torch-model-archiver --handler",
        description="Print the absolute path of a handler file shipped with guardian-plugin, for "
                    "torch-model-archiver, which copies --handler as a file (a dotted module path such as "
                    "guardian_plugin.handlers.GuardedImageClassifier fails there): "
                    'torch-model-archiver ... --handler "$(guardian handler-file image-classifier)"')
    h.add_argument("name", choices=sorted(FILES), help="image-classifier: TorchServe's ImageClassifier behind the "
                   "guard; wrap: the archive's own handler (handler: guardian: wrap:) behind the guard")
    h.set_defaults(func=_handler_file)
