// vulkan/vk_loader.cpp — dlopen of libvulkan.so.1 and the function table.
// Owner: the Vulkan device. Thread-safety: loading under a lock (see vk_loader.h).
#include "vulkan/vk_loader.h"

#include <dlfcn.h>

#include <mutex>

namespace lmx::vk {

namespace {
std::mutex g_mu;
void* g_lib = nullptr;  // never dlclosed: layers and drivers keep pointers into it
}  // namespace

Fns& fns() {
    static Fns f;
    return f;
}

bool vk_load_loader(std::string* why) {
    std::lock_guard<std::mutex> lk(g_mu);
    if (g_lib != nullptr) return true;
    void* lib = dlopen("libvulkan.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) lib = dlopen("libvulkan.so", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
        const char* e = dlerror();
        *why = std::string("no Vulkan loader: ") + (e ? e : "libvulkan.so.1 not found") +
               " (install libvulkan1 and a driver, e.g. mesa-vulkan-drivers)";
        return false;
    }
    Fns& f = fns();
    f.vkGetInstanceProcAddr = reinterpret_cast<PFN_vkGetInstanceProcAddr>(dlsym(lib, "vkGetInstanceProcAddr"));
    if (f.vkGetInstanceProcAddr == nullptr) {
        *why = "the Vulkan loader has no vkGetInstanceProcAddr";
        return false;
    }
#define LMX_VK_LOAD(name) f.name = reinterpret_cast<PFN_##name>(f.vkGetInstanceProcAddr(nullptr, #name));
    LMX_VK_GLOBAL_FNS(LMX_VK_LOAD)
#undef LMX_VK_LOAD
    if (f.vkCreateInstance == nullptr || f.vkEnumerateInstanceVersion == nullptr) {
        *why = "the Vulkan loader is older than Vulkan 1.1";
        return false;
    }
    g_lib = lib;
    return true;
}

void vk_load_instance(VkInstance inst) {
    Fns& f = fns();
#define LMX_VK_LOAD(name) f.name = reinterpret_cast<PFN_##name>(f.vkGetInstanceProcAddr(inst, #name));
    LMX_VK_INSTANCE_FNS(LMX_VK_LOAD)
    LMX_VK_DEBUG_FNS(LMX_VK_LOAD)
#undef LMX_VK_LOAD
}

void vk_load_device(VkDevice dev) {
    Fns& f = fns();
#define LMX_VK_LOAD(name) f.name = reinterpret_cast<PFN_##name>(f.vkGetDeviceProcAddr(dev, #name));
    LMX_VK_DEVICE_FNS(LMX_VK_LOAD)
#undef LMX_VK_LOAD
}

const char* vk_result_name(VkResult r) {
    switch (r) {
        case VK_SUCCESS: return "VK_SUCCESS";
        case VK_NOT_READY: return "VK_NOT_READY";
        case VK_TIMEOUT: return "VK_TIMEOUT";
        case VK_INCOMPLETE: return "VK_INCOMPLETE";
        case VK_ERROR_OUT_OF_HOST_MEMORY: return "VK_ERROR_OUT_OF_HOST_MEMORY";
        case VK_ERROR_OUT_OF_DEVICE_MEMORY: return "VK_ERROR_OUT_OF_DEVICE_MEMORY";
        case VK_ERROR_INITIALIZATION_FAILED: return "VK_ERROR_INITIALIZATION_FAILED";
        case VK_ERROR_DEVICE_LOST: return "VK_ERROR_DEVICE_LOST";
        case VK_ERROR_LAYER_NOT_PRESENT: return "VK_ERROR_LAYER_NOT_PRESENT";
        case VK_ERROR_EXTENSION_NOT_PRESENT: return "VK_ERROR_EXTENSION_NOT_PRESENT";
        case VK_ERROR_FEATURE_NOT_PRESENT: return "VK_ERROR_FEATURE_NOT_PRESENT";
        case VK_ERROR_INCOMPATIBLE_DRIVER: return "VK_ERROR_INCOMPATIBLE_DRIVER";
        case VK_ERROR_TOO_MANY_OBJECTS: return "VK_ERROR_TOO_MANY_OBJECTS";
        case VK_ERROR_OUT_OF_POOL_MEMORY: return "VK_ERROR_OUT_OF_POOL_MEMORY";
        default: return "VkResult(other)";
    }
}

}  // namespace lmx::vk
