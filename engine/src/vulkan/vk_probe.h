// vulkan/vk_probe.h — what the rest of the engine may ask about Vulkan without its headers.
// Owner: the Vulkan device. Thread-safety: pure queries (vulkan_devices creates and destroys
// a throwaway instance).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "device.h"

namespace lmx {

// Whether this build has the Vulkan device (LMX_VULKAN found headers and glslc).
bool vulkan_built();
// The Vulkan devices present, "0: llvmpipe (...) (cpu, Vulkan 1.3)"; empty with *why set
// to one line saying what is missing (not built / no loader / no device).
std::vector<std::string> vulkan_devices(std::string* why);
// The Vulkan device `index` with min(budget_bytes, its device-local heap) of memory, validation
// per LMX_VK_VALIDATION. Throws Error naming what was found when it cannot ("device kind vulkan:
// expected a Vulkan device, found none: <why>").
std::unique_ptr<Device> make_vulkan_device(int index, uint64_t budget_bytes);
// Validation-layer messages seen in this process (0 without Vulkan); tests fail on any.
uint64_t vulkan_validation_messages();
// One line for `layermux status`: name, driver, heap, transfer queue (empty for other devices).
std::string vulkan_device_summary(Device& dev);
// Why the Vulkan device last refused memory (the driver's out-of-device-memory, with the bytes
// asked and held), once; "" for other devices or when it did not.
std::string vulkan_alloc_failure(Device& dev);

}  // namespace lmx
