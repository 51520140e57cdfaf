// The Python module of the native CPU kernels (monai_gradicon/maps/native.py builds the three files as one extension).

#include <torch/extension.h>

#include <vector>

torch::Tensor trilinear_forward(const torch::Tensor& field, const torch::Tensor& coords);
std::vector<torch::Tensor> trilinear_backward(const torch::Tensor& grad_out, const torch::Tensor& field, const torch::Tensor& coords,
                                              bool field_grad, bool coords_grad);
torch::Tensor upsample_add_concat(const torch::Tensor& base, const torch::Tensor& coarse, const torch::Tensor& skip);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("trilinear_forward", &trilinear_forward, "trilinear interpolation at [0, 1] coordinates, border padding");
  m.def("trilinear_backward", &trilinear_backward, "gradients of trilinear_forward with respect to the field and the coordinates");
  m.def("upsample_add_concat", &upsample_add_concat, "cat([base + upsample2(coarse), skip]) over the grid of skip, channels-last");
}
