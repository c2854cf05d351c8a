"""Every Triton kernel, forward and backward, once, at small ragged shapes: the program compute-sanitizer runs
(bench/gpu_run.sh's sanitizer step), where out-of-bounds accesses and races show that the interpreter cannot see.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python -m bench.sanitize_kernels

bf16; sizes that are multiples of no tile (partial tiles, masked rows and columns), a head_dim that is not a power of
two, causal and not. The first call of each kernel also runs its autotuner, so every tile configuration is checked.
"""
import torch

from bench.common import require_cuda
from tritongpt.kernels import add_layer_norm, flash_attention, gelu_mlp, layer_norm, linear_cross_entropy


def main():
    device = require_cuda()
    torch.manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device)).to(torch.bfloat16).requires_grad_()

    def forward_backward(outputs, inputs):
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.grad(outputs, inputs, [torch.randn_like(o) for o in outputs])

    for shape, causal in (((2, 3, 200, 64), True), ((1, 2, 77, 48), False)):
        q, k, v = (leaf(*shape) for _ in range(3))
        forward_backward(flash_attention(q, k, v, causal=causal), (q, k, v))
    x, residual, weight, bias = leaf(100, 1000), leaf(100, 1000), leaf(1000), leaf(1000)
    forward_backward(layer_norm(x, weight, bias), (x, weight, bias))
    forward_backward(add_layer_norm(x, residual, weight, bias), (x, residual, weight, bias))
    params = (leaf(100, 96), leaf(200, 96, scale=0.1), leaf(200, scale=0.1), leaf(96, 200, scale=0.1),
              leaf(96, scale=0.1))
    forward_backward(gelu_mlp(*params, approximate="tanh"), params)
    vocab = 8192 + 777  # two of the backward's vocabulary chunks, the second ragged
    x, head = leaf(3, 100, 200), leaf(vocab, 200, scale=0.1)
    targets = torch.randint(0, vocab, (3, 100), device=device)
    targets = targets.masked_fill(torch.rand(3, 100, device=device) < 0.2, -1)
    forward_backward(linear_cross_entropy(x, head, targets), (x, head))
    torch.cuda.synchronize()
    print("ran flash_attention, layer_norm, add_layer_norm, gelu_mlp and linear_cross_entropy forward and backward")


if __name__ == "__main__":
    main()
