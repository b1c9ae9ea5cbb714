"""Between an API's own values and the guard's tensors: the preprocessed input as (B, C, H, W), the
returned probabilities as (B, K) and back to the API's type and shape."""

from __future__ import annotations

import torch


def _as_input_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        pass
    else:
        try:
            import numpy as np

            x = torch.from_numpy(np.asarray(x))
        except Exception as e:
            raise TypeError(f"preprocess must return a tensor or array, got {type(x).__name__}") from e
    x = x.detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"preprocess must give (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    return x.float()


def _as_prob_tensor(probs):
    """(B, K) tensor view of an API's probabilities, and a function that turns a (B, K) tensor back
    into the API's own type and shape."""
    import numpy as np

    if isinstance(probs, torch.Tensor):
        p = probs.detach()
        one = p.dim() == 1
        p2 = p.unsqueeze(0) if one else p

        def restore(out):
            out = out.to(probs.dtype)
            return out[0] if one else out
    elif isinstance(probs, np.ndarray):
        one = probs.ndim == 1
        p2 = torch.from_numpy(np.ascontiguousarray(probs.reshape(1, -1) if one else probs))

        def restore(out):
            a = out.cpu().numpy().astype(probs.dtype, copy=False)
            return a[0] if one else a
    elif isinstance(probs, (list, tuple)):
        arr = torch.tensor(probs, dtype=torch.float64)
        one = arr.dim() == 1
        p2 = arr.unsqueeze(0) if one else arr

        def restore(out):
            lst = out.to(torch.float64).tolist()
            return lst[0] if one else lst
    else:
        raise TypeError(f"a guarded API must return class probabilities (tensor, array or list), "
                        f"got {type(probs).__name__}")
    if p2.dim() != 2:
        raise ValueError(f"probabilities must be (K,) or (B, K), got shape {tuple(p2.shape)}")
    return p2, restore
