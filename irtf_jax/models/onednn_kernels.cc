// oneDNN's direct convolution backward-weights kernel as an XLA FFI handler.
//
// Built on first use by irtf_jax/models/onednn.py against the onednn-cpu-gomp
// wheel (the `cpu-onednn` extra) and jaxlib's FFI headers. XLA:CPU has no
// direct kernel for this; see onednn.py for why and what it gains.
//
//   dw[a, b, c, o] = sum_{n, i, j} xpad[n, s_h i + a, s_w j + b, c] dy[n, i, j, o]
//
// x: (N, H, W, C) f32, dy: (N, H', W', O) f32 (NHWC), dw: (kh, kw, C, O) f32
// (HWIO). Attributes: strides and the top/left padding; the bottom/right
// padding follows from the shapes.

#include <omp.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct BackwardWeights {
  dnnl::convolution_backward_weights primitive;
  dnnl::memory::desc src, diff_dst, diff_weights, hwio, scratchpad;
};

using Shape = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                         int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                         int64_t>;

// One primitive per shape, made once: creating it JIT-compiles its kernel.
// Executing a primitive from several threads at once is safe in oneDNN; the
// scratchpad is the caller's, one per call.
const BackwardWeights& Primitive(const Shape& shape) {
  static std::mutex mutex;
  static std::map<Shape, std::unique_ptr<BackwardWeights>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(shape);
  if (found != cache.end()) return *found->second;
  auto [n, h, w, c, ho, wo, o, kh, kw, sh, sw, pt, pl] = shape;
  using tag = dnnl::memory::format_tag;
  const auto f32 = dnnl::memory::data_type::f32;
  dnnl::memory::desc src({n, c, h, w}, f32, tag::nhwc);
  dnnl::memory::desc diff_dst({n, o, ho, wo}, f32, tag::nhwc);
  dnnl::memory::desc any_weights({o, c, kh, kw}, f32, tag::any);
  dnnl::memory::desc hwio({o, c, kh, kw}, f32, tag::hwio);
  dnnl::memory::dims strides{sh, sw}, pad_before{pt, pl};
  dnnl::memory::dims pad_after{(ho - 1) * sh + kh - h - pt,
                               (wo - 1) * sw + kw - w - pl};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto forward = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, src, any_weights, diff_dst, strides,
      pad_before, pad_after);
  auto backward = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, src, any_weights,
      diff_dst, strides, pad_before, pad_after, forward, attr);
  auto made = std::make_unique<BackwardWeights>(BackwardWeights{
      dnnl::convolution_backward_weights(backward), src, diff_dst,
      backward.diff_weights_desc(), hwio, backward.scratchpad_desc()});
  return *(cache[shape] = std::move(made));
}

ffi::Error ConvBackwardWeights(ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h,
                               int64_t stride_w, int64_t pad_top,
                               int64_t pad_left) {
  auto xs = x.dimensions();
  auto ys = dy.dimensions();
  auto ws = dw->dimensions();
  if (xs.size() != 4 || ys.size() != 4 || ws.size() != 4 || xs[0] != ys[0] ||
      ws[2] != xs[3] || ws[3] != ys[3]) {
    return ffi::Error::InvalidArgument(
        "irtf_onednn_conv_backward_weights: expects x (N, H, W, C), "
        "dy (N, H', W', O) and dw (kh, kw, C, O)");
  }
  // One thread per call: XLA calls this from its own thread pool, and the
  // train step runs the query's and the target's encoder passes side by
  // side. Teams of OpenMP threads started from two XLA threads at once
  // oversubscribe the cores (and oneDNN's in-kernel barriers then spin).
  omp_set_num_threads(1);
  try {
    const BackwardWeights& p = Primitive(Shape{
        xs[0], xs[1], xs[2], xs[3], ys[1], ys[2], ys[3], ws[0], ws[1],
        stride_h, stride_w, pad_top, pad_left});
    dnnl::stream stream(Engine());
    dnnl::memory src(p.src, Engine(), x.typed_data());
    dnnl::memory diff_dst(p.diff_dst, Engine(), dy.typed_data());
    dnnl::memory hwio(p.hwio, Engine(), dw->typed_data());
    dnnl::memory scratchpad(p.scratchpad, Engine());
    const bool reorder = p.diff_weights != p.hwio;
    dnnl::memory diff_weights =
        reorder ? dnnl::memory(p.diff_weights, Engine()) : hwio;
    p.primitive.execute(stream, {{DNNL_ARG_SRC, src},
                                 {DNNL_ARG_DIFF_DST, diff_dst},
                                 {DNNL_ARG_DIFF_WEIGHTS, diff_weights},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (reorder) dnnl::reorder(diff_weights, hwio).execute(stream, diff_weights, hwio);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(IrtfOnednnConvBackwardWeights,
                              ConvBackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
