// Trilinear interpolation of a 3D field at points given in [0, 1] coordinates, border padding
// (align_corners=True), with its gradients: the hot path of maps/grid.py:sample on CPU.
//
// Compiled on first use by monai_gradicon/maps/native.py (torch.utils.cpp_extension); bound in native.cpp.
// Arithmetic per point, with x_k = clamp(((2 c_k - 1) + 1) / 2 * (N_k - 1), 0, N_k - 1), i_k = floor(x_k), f_k = x_k - i_k:
//   value        = sum over the 8 corners of w_zyx * v_zyx, w = (1-f or f) per axis, in corner order
//                  (the same weights and order as torch.nn.functional.grid_sample's CPU kernel);
//   d value/d c_k = (N_k - 1) * sum over the other axes' weights of (v[upper_k] - v[lower_k]),
//                  0 where the point was clamped (as grid_sample's border padding);
//   d field      = the 8 weights times the output gradient, scattered to the corners.
// The field may have any strides (channels-last included). Points are split into one slab per thread.
// The first slab scatters its field gradient straight into the result; each other slab into a private
// buffer that covers only the voxel range it reaches (about 1/threads of the field for a near-identity
// map), added to the result in slab order afterwards, so the result does not depend on scheduling.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

// one axis of a point: lower corner index, fraction, and d(voxel coordinate)/d(coordinate)
template <typename T>
struct Axis {
  int64_t index;
  bool has_upper;  // false at the last voxel (its weight is 0 there)
  T frac;
  T mult;
};

template <typename T>
inline Axis<T> locate(T coordinate, int64_t size) {
  const T last = static_cast<T>(size - 1);
  // grid_sample's own rounding of the grid the package hands it (2c - 1, then back to voxels), so that
  // every point falls into the same voxel cell as there (the gradient jumps across cell faces)
  T x = ((coordinate * T(2) - T(1)) + T(1)) / T(2) * last;
  Axis<T> a;
  if (x > T(0) && x < last) {
    a.mult = last;
  } else {  // clamped to the border (NaN and infinities included): no gradient
    a.mult = T(0);
    x = x > T(0) ? last : T(0);
  }
  a.index = static_cast<int64_t>(x);  // x >= 0: truncation is floor
  a.has_upper = a.index + 1 < size;
  a.frac = x - static_cast<T>(a.index);
  return a;
}

struct Geometry {
  int64_t channels, size[3], stride_c, stride[3];  // field
  int64_t points;
};

inline Geometry geometry(const torch::Tensor& field, const torch::Tensor& coords) {
  Geometry g;
  g.channels = field.size(1);
  g.stride_c = field.stride(1);
  for (int k = 0; k < 3; ++k) {
    g.size[k] = field.size(2 + k);
    g.stride[k] = field.stride(2 + k);
  }
  g.points = coords[0][0].numel();
  return g;
}

// the voxel cell around point p: its axes, the linear weights per axis, the field's lower corner and the
// offsets to its upper corners (0 at the last voxel, whose weight is 0)
template <typename T>
struct Cell {
  Axis<T> z, y, x;
  T z0, z1, y0, y1, x0, x1;
  int64_t dz, dy, dx;
  const T* v;
};

template <typename T>
inline Cell<T> cell(const T* field, const T* coords, int64_t p, const Geometry& g) {
  Cell<T> k;
  const int64_t P = g.points;
  k.z = locate(coords[p], g.size[0]);
  k.y = locate(coords[P + p], g.size[1]);
  k.x = locate(coords[2 * P + p], g.size[2]);
  k.z0 = T(1) - k.z.frac, k.z1 = k.z.frac, k.y0 = T(1) - k.y.frac, k.y1 = k.y.frac, k.x0 = T(1) - k.x.frac, k.x1 = k.x.frac;
  k.dz = k.z.has_upper ? g.stride[0] : 0, k.dy = k.y.has_upper ? g.stride[1] : 0, k.dx = k.x.has_upper ? g.stride[2] : 0;
  k.v = field + k.z.index * g.stride[0] + k.y.index * g.stride[1] + k.x.index * g.stride[2];
  return k;
}

// the slabs of points processed by one thread each
inline int64_t slab_count(int64_t points) {
  const int64_t min_points = 8192;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), points / min_points));
}

template <typename T>
void forward_one(const T* field, const T* coords, T* out, const Geometry& g) {
  const int64_t P = g.points, C = g.channels;
  const int64_t slabs = slab_count(P), per = (P + slabs - 1) / slabs;
  at::parallel_for(0, slabs, 1, [&](int64_t s_begin, int64_t s_end) {
    for (int64_t p = s_begin * per; p < std::min(P, s_end * per); ++p) {
      const Cell<T> k = cell(field, coords, p, g);
      const int64_t dz = k.dz, dy = k.dy, dx = k.dx;
      const T x0 = k.x0, x1 = k.x1, y0 = k.y0, y1 = k.y1, z0 = k.z0, z1 = k.z1;
      const T w000 = x0 * y0 * z0, w001 = x1 * y0 * z0, w010 = x0 * y1 * z0, w011 = x1 * y1 * z0;
      const T w100 = x0 * y0 * z1, w101 = x1 * y0 * z1, w110 = x0 * y1 * z1, w111 = x1 * y1 * z1;
      const T* v = k.v;
      for (int64_t c = 0; c < C; ++c, v += g.stride_c) {
        T value = v[0] * w000;
        value += v[dx] * w001;
        value += v[dy] * w010;
        value += v[dy + dx] * w011;
        value += v[dz] * w100;
        value += v[dz + dx] * w101;
        value += v[dz + dy] * w110;
        value += v[dz + dy + dx] * w111;
        out[c * P + p] = value;
      }
    }
  });
}

// grad_field: contiguous (C, N0, N1, N2), accumulated into (+=); grad_coords: contiguous (3, P), written
template <typename T>
void backward_one(const T* grad_out, const T* field, const T* coords, T* grad_field, T* grad_coords, const Geometry& g) {
  const int64_t P = g.points, C = g.channels;
  const int64_t plane = g.size[1] * g.size[2], row = g.size[2], voxels = g.size[0] * plane;
  const int64_t slabs = slab_count(P), per = (P + slabs - 1) / slabs;
  std::vector<int64_t> lo(slabs, 0), span(slabs, 0);
  std::vector<std::vector<T>> buffers(slabs);
  at::parallel_for(0, slabs, 1, [&](int64_t s_begin, int64_t s_end) {
    for (int64_t s = s_begin; s < s_end; ++s) {
      const int64_t p_begin = s * per, p_end = std::min(P, p_begin + per);
      T* buffer = nullptr;
      int64_t channel_stride = voxels;
      if (grad_field != nullptr && s == 0) {  // the first slab scatters straight into the gradient
        buffer = grad_field;
      } else if (grad_field != nullptr && p_begin < p_end) {  // the voxel range this slab's corners reach
        int64_t first = voxels, last = 0;
        for (int64_t p = p_begin; p < p_end; ++p) {
          const Cell<T> k = cell(field, coords, p, g);
          const int64_t o = k.z.index * plane + k.y.index * row + k.x.index;
          first = std::min(first, o);
          last = std::max(last, o);
        }
        lo[s] = first;
        span[s] = std::min(voxels, last + plane + row + 2) - first;
        buffers[s].assign(static_cast<size_t>(C * span[s]), T(0));
        buffer = buffers[s].data();
        channel_stride = span[s];
      }
      for (int64_t p = p_begin; p < p_end; ++p) {
        const Cell<T> k = cell(field, coords, p, g);
        const Axis<T>&z = k.z, &y = k.y, &x = k.x;
        const int64_t dz = k.dz, dy = k.dy, dx = k.dx;
        const T x0 = k.x0, x1 = k.x1, y0 = k.y0, y1 = k.y1, z0 = k.z0, z1 = k.z1;
        const T* v = k.v;
        T gz = 0, gy = 0, gx = 0;
        for (int64_t c = 0; c < C; ++c, v += g.stride_c) {
          const T go = grad_out[c * P + p];
          const T v000 = v[0], v001 = v[dx], v010 = v[dy], v011 = v[dy + dx];
          const T v100 = v[dz], v101 = v[dz + dx], v110 = v[dz + dy], v111 = v[dz + dy + dx];
          // x-interpolated edges, then y-interpolated faces
          const T e00 = x0 * v000 + x1 * v001, e01 = x0 * v010 + x1 * v011;
          const T e10 = x0 * v100 + x1 * v101, e11 = x0 * v110 + x1 * v111;
          const T f0 = y0 * e00 + y1 * e01, f1 = y0 * e10 + y1 * e11;
          gz += go * (f1 - f0);
          gy += go * (z0 * (e01 - e00) + z1 * (e11 - e10));
          gx += go * (z0 * (y0 * (v001 - v000) + y1 * (v011 - v010)) + z1 * (y0 * (v101 - v100) + y1 * (v111 - v110)));
          if (buffer != nullptr) {
            const int64_t sz = z.has_upper ? plane : 0, sy = y.has_upper ? row : 0, sx = x.has_upper ? 1 : 0;
            T* q = buffer + c * channel_stride + (z.index * plane + y.index * row + x.index - lo[s]);
            const T gz0 = go * z0, gz1 = go * z1;
            const T g00 = gz0 * y0, g01 = gz0 * y1, g10 = gz1 * y0, g11 = gz1 * y1;
            q[0] += g00 * x0;
            q[sx] += g00 * x1;
            q[sy] += g01 * x0;
            q[sy + sx] += g01 * x1;
            q[sz] += g10 * x0;
            q[sz + sx] += g10 * x1;
            q[sz + sy] += g11 * x0;
            q[sz + sy + sx] += g11 * x1;
          }
        }
        if (grad_coords != nullptr) {
          grad_coords[p] = gz * z.mult;
          grad_coords[P + p] = gy * y.mult;
          grad_coords[2 * P + p] = gx * x.mult;
        }
      }
    }
  });
  if (grad_field == nullptr) return;
  at::parallel_for(0, voxels, 32768, [&](int64_t v_begin, int64_t v_end) {
    for (int64_t s = 1; s < slabs; ++s) {
      const int64_t b = std::max(v_begin, lo[s]), e = std::min(v_end, lo[s] + span[s]);
      for (int64_t c = 0; c < C && b < e; ++c) {
        const T* src = buffers[s].data() + c * span[s] - lo[s];
        T* dst = grad_field + c * voxels;
        for (int64_t i = b; i < e; ++i) dst[i] += src[i];
      }
    }
  });
}

void check(const torch::Tensor& field, const torch::Tensor& coords) {
  TORCH_CHECK(field.dim() == 5 && coords.dim() >= 3 && coords.size(1) == 3, "trilinear: field (B, C, N0, N1, N2) and coords (B, 3, ...) expected");
  TORCH_CHECK(field.device().is_cpu() && coords.device().is_cpu(), "trilinear: CPU tensors expected");
  TORCH_CHECK(field.scalar_type() == coords.scalar_type(), "trilinear: field and coords must share the dtype");
  TORCH_CHECK(coords.is_contiguous(), "trilinear: contiguous coords expected");
  const int64_t bf = field.size(0), bc = coords.size(0);
  TORCH_CHECK(bf == bc || bf == 1 || bc == 1, "trilinear: batch sizes must agree or be 1");
}

}  // namespace

torch::Tensor trilinear_forward(const torch::Tensor& field, const torch::Tensor& coords) {
  check(field, coords);
  const int64_t bf = field.size(0), bc = coords.size(0), batch = std::max(bf, bc);
  std::vector<int64_t> shape = {batch, field.size(1)};
  for (int64_t k = 2; k < coords.dim(); ++k) shape.push_back(coords.size(k));
  torch::Tensor out = torch::empty(shape, field.options().memory_format(at::MemoryFormat::Contiguous));
  const Geometry g = geometry(field, coords);
  AT_DISPATCH_FLOATING_TYPES(field.scalar_type(), "trilinear_forward", [&] {
    for (int64_t b = 0; b < batch; ++b)
      forward_one<scalar_t>(field.data_ptr<scalar_t>() + (bf > 1 ? b : 0) * field.stride(0),
                            coords.data_ptr<scalar_t>() + (bc > 1 ? b : 0) * coords.stride(0),
                            out.data_ptr<scalar_t>() + b * out.stride(0), g);
  });
  return out;
}

std::vector<torch::Tensor> trilinear_backward(const torch::Tensor& grad_out, const torch::Tensor& field, const torch::Tensor& coords,
                                              bool field_grad, bool coords_grad) {
  check(field, coords);
  const torch::Tensor go = grad_out.contiguous();
  const int64_t bf = field.size(0), bc = coords.size(0), batch = std::max(bf, bc);
  torch::Tensor grad_field = field_grad ? torch::zeros(field.sizes(), field.options().memory_format(at::MemoryFormat::Contiguous)) : torch::Tensor();
  const bool sum_coords = bc == 1 && batch > 1;  // one point set shared by the batch: its gradients add up
  torch::Tensor grad_coords = !coords_grad ? torch::Tensor()
                              : sum_coords ? torch::zeros(coords.sizes(), coords.options())
                                           : torch::empty(coords.sizes(), coords.options());
  const Geometry g = geometry(field, coords);
  const int64_t field_numel = field_grad ? grad_field[0].numel() : 0;
  AT_DISPATCH_FLOATING_TYPES(field.scalar_type(), "trilinear_backward", [&] {
    std::vector<scalar_t> coords_sum;
    for (int64_t b = 0; b < batch; ++b) {
      scalar_t* gc = nullptr;
      if (coords_grad && sum_coords) {
        coords_sum.assign(static_cast<size_t>(3 * g.points), scalar_t(0));
        gc = coords_sum.data();
      } else if (coords_grad) {
        gc = grad_coords.data_ptr<scalar_t>() + b * grad_coords.stride(0);
      }
      backward_one<scalar_t>(go.data_ptr<scalar_t>() + b * go.stride(0), field.data_ptr<scalar_t>() + (bf > 1 ? b : 0) * field.stride(0),
                             coords.data_ptr<scalar_t>() + (bc > 1 ? b : 0) * coords.stride(0),
                             field_grad ? grad_field.data_ptr<scalar_t>() + (bf > 1 ? b : 0) * field_numel : nullptr, gc, g);
      if (coords_grad && sum_coords) {
        scalar_t* dst = grad_coords.data_ptr<scalar_t>();
        for (int64_t i = 0; i < 3 * g.points; ++i) dst[i] += coords_sum[i];
      }
    }
  });
  return {grad_field, grad_coords};
}
