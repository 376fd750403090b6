// The compute shaders of src/backend/vulkan/shaders as SPIR-V, compiled by glslc at build time
// and embedded by cmake/embed_spirv.cmake.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace kestrel::vulkan {

struct ShaderCode {
  const char* name;  // the shader file's stem: "matmul", "attention", ...
  const uint32_t* words;
  size_t n_words;
};

std::span<const ShaderCode> shader_table();

}  // namespace kestrel::vulkan
