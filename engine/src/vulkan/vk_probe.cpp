// vulkan/vk_probe.cpp — compiled into every build (with or without Vulkan), see vk_probe.h.
// Owner: the Vulkan device. Thread-safety: see vk_probe.h.
#include "vulkan/vk_probe.h"

#include "common.h"

#if LMX_HAVE_VULKAN
#include "vulkan/vk_context.h"
#include "vulkan/vk_device.h"
#endif

namespace lmx {

bool vulkan_built() { return LMX_HAVE_VULKAN != 0; }

std::vector<std::string> vulkan_devices(std::string* why) {
#if LMX_HAVE_VULKAN
    return vk::list_devices(why);
#else
    *why = "this engine was built without Vulkan (no vulkan/vulkan.h or glslc at build time; install libvulkan-dev "
           "and glslc, then rebuild)";
    return {};
#endif
}

std::unique_ptr<Device> make_vulkan_device(int index, uint64_t budget_bytes) {
    std::string why;
    const std::vector<std::string> devs = vulkan_devices(&why);
    if (devs.empty()) throw Error("device kind vulkan: expected a Vulkan device, found none: " + why);
#if LMX_HAVE_VULKAN
    auto ctx = std::make_shared<vk::Context>(vk::Options::from_env(index));
    return std::make_unique<vk::VulkanDevice>(ctx, budget_bytes);
#else
    (void)index;
    (void)budget_bytes;
    throw Error("device kind vulkan: " + why);
#endif
}

uint64_t vulkan_validation_messages() {
#if LMX_HAVE_VULKAN
    return vk::validation_message_count();
#else
    return 0;
#endif
}

std::string vulkan_alloc_failure(Device& dev) {
#if LMX_HAVE_VULKAN
    auto* v = dynamic_cast<vk::VulkanDevice*>(&dev);
    return v == nullptr ? "" : v->take_alloc_failure();
#else
    (void)dev;
    return "";
#endif
}

std::string vulkan_device_summary(Device& dev) {
#if LMX_HAVE_VULKAN
    auto* v = dynamic_cast<vk::VulkanDevice*>(&dev);
    if (v == nullptr) return "";
    const vk::Info& in = v->ctx().info();
    return in.name + "; driver " + in.driver + "; device-local heap " +
           std::to_string(in.device_local_heap_bytes >> 20) + " MiB; " +
           (in.dedicated_transfer_queue ? "dedicated transfer queue" : "copies on the compute queue") +
           (in.timestamp_valid_bits > 0 ? "; copy wait from GPU timestamps" : "; copy wait measured on the host");
#else
    (void)dev;
    return "";
#endif
}

}  // namespace lmx
