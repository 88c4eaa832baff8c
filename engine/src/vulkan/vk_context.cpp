// vulkan/vk_context.cpp — instance, device, queues, pipelines, command streams.
// Owner: the Vulkan device. Thread-safety: see vk_context.h.
#include "vulkan/vk_context.h"

#include <cassert>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "vulkan/vk_shaders.h"

namespace lmx::vk {

namespace {

std::atomic<uint64_t> g_n_messages{0};
std::mutex g_msg_mu;
std::string g_last_message;

VKAPI_ATTR VkBool32 VKAPI_CALL on_message(VkDebugUtilsMessageSeverityFlagBitsEXT severity,
                                          VkDebugUtilsMessageTypeFlagsEXT, const VkDebugUtilsMessengerCallbackDataEXT* d,
                                          void*) {
    const uint64_t n = ++g_n_messages;
    const char* text = d != nullptr && d->pMessage != nullptr ? d->pMessage : "(no text)";
    {
        std::lock_guard<std::mutex> lk(g_msg_mu);
        g_last_message = text;
    }
    if (n <= 20) std::fprintf(stderr, "[vulkan validation %s] %s\n",
                              severity >= VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT ? "error" : "warning", text);
    return VK_FALSE;
}

bool env_flag(const char* name) {
    const char* v = std::getenv(name);
    return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

const char* type_name(VkPhysicalDeviceType t) {
    switch (t) {
        case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return "discrete";
        case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return "integrated";
        case VK_PHYSICAL_DEVICE_TYPE_CPU: return "cpu";
        case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return "virtual";
        default: return "other";
    }
}

std::string version_str(uint32_t v) {
    return std::to_string(VK_API_VERSION_MAJOR(v)) + "." + std::to_string(VK_API_VERSION_MINOR(v));
}

bool has_layer(const char* name) {
    uint32_t n = 0;
    fns().vkEnumerateInstanceLayerProperties(&n, nullptr);
    std::vector<VkLayerProperties> props(n);
    fns().vkEnumerateInstanceLayerProperties(&n, props.data());
    for (const auto& p : props)
        if (std::strcmp(p.layerName, name) == 0) return true;
    return false;
}

constexpr const char* kValidationLayer = "VK_LAYER_KHRONOS_validation";

// A bare instance (no layers) for listing devices.
VkInstance make_instance(bool validation, const VkDebugUtilsMessengerCreateInfoEXT* dbg) {
    VkApplicationInfo app{VK_STRUCTURE_TYPE_APPLICATION_INFO};
    app.pApplicationName = "layermux";
    app.apiVersion = VK_API_VERSION_1_2;
    VkInstanceCreateInfo ci{VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO};
    ci.pApplicationInfo = &app;
    std::vector<const char*> layers, exts;
    VkValidationFeatureEnableEXT enables[] = {VK_VALIDATION_FEATURE_ENABLE_SYNCHRONIZATION_VALIDATION_EXT};
    VkValidationFeaturesEXT features{VK_STRUCTURE_TYPE_VALIDATION_FEATURES_EXT};
    if (validation) {
        if (!has_layer(kValidationLayer))
            throw Error(std::string("LMX_VK_VALIDATION=1: expected the layer ") + kValidationLayer +
                        ", found none (install vulkan-validationlayers)");
        layers.push_back(kValidationLayer);
        exts.push_back(VK_EXT_DEBUG_UTILS_EXTENSION_NAME);
        exts.push_back(VK_EXT_VALIDATION_FEATURES_EXTENSION_NAME);
        features.enabledValidationFeatureCount = 1;
        features.pEnabledValidationFeatures = enables;
        features.pNext = dbg;  // messages of vkCreateInstance / vkDestroyInstance too
        ci.pNext = &features;
    }
    ci.enabledLayerCount = static_cast<uint32_t>(layers.size());
    ci.ppEnabledLayerNames = layers.data();
    ci.enabledExtensionCount = static_cast<uint32_t>(exts.size());
    ci.ppEnabledExtensionNames = exts.data();
    VkInstance inst = VK_NULL_HANDLE;
    const VkResult r = fns().vkCreateInstance(&ci, nullptr, &inst);
    if (r == VK_ERROR_INCOMPATIBLE_DRIVER)
        throw Error("the Vulkan loader found no driver supporting Vulkan 1.2 (install your GPU's Vulkan driver, or "
                    "mesa-vulkan-drivers for lavapipe)");
    vk_check(r, "vkCreateInstance");
    vk_load_instance(inst);
    return inst;
}

std::vector<VkPhysicalDevice> physical_devices(VkInstance inst) {
    uint32_t n = 0;
    vk_check(fns().vkEnumeratePhysicalDevices(inst, &n, nullptr), "vkEnumeratePhysicalDevices");
    std::vector<VkPhysicalDevice> out(n);
    vk_check(fns().vkEnumeratePhysicalDevices(inst, &n, out.data()), "vkEnumeratePhysicalDevices");
    out.resize(n);
    return out;
}

std::string describe(VkPhysicalDevice p, int i) {
    VkPhysicalDeviceProperties props;
    fns().vkGetPhysicalDeviceProperties(p, &props);
    return std::to_string(i) + ": " + props.deviceName + " (" + type_name(props.deviceType) + ", Vulkan " +
           version_str(props.apiVersion) + ")";
}

}  // namespace

void vk_check(VkResult r, const char* what) {
    if (r == VK_SUCCESS) return;
    const std::string msg = std::string(what) + " failed: " + vk_result_name(r);
    if (r == VK_ERROR_DEVICE_LOST) throw DeviceLostError(msg + " (the GPU was reset or the driver crashed)");
    if (r == VK_ERROR_OUT_OF_DEVICE_MEMORY || r == VK_ERROR_OUT_OF_HOST_MEMORY) throw DeviceOutOfMemoryError(msg);
    throw Error(msg);
}

Options Options::from_env(int device_index) {
    Options o;
    o.device_index = device_index;
    o.validation = env_flag("LMX_VK_VALIDATION");
    if (const char* v = std::getenv("LMX_VK_MAX_BINDING_BYTES")) o.max_binding_bytes = std::strtoull(v, nullptr, 10);
    o.use_transfer_queue = !env_flag("LMX_VK_NO_TRANSFER_QUEUE");
    o.use_timestamps = !env_flag("LMX_VK_NO_TIMESTAMPS");
    if (const char* v = std::getenv("LMX_VK_BLOCK_BYTES")) o.block_bytes = std::strtoull(v, nullptr, 10);
    if (const char* v = std::getenv("LMX_VK_LOSE_DEVICE_AFTER"); v != nullptr && v[0] != '\0')
        o.lose_device_after = std::strtoll(v, nullptr, 10);
    return o;
}

uint64_t validation_message_count() { return g_n_messages.load(); }
std::string last_validation_message() {
    std::lock_guard<std::mutex> lk(g_msg_mu);
    return g_last_message;
}

std::vector<std::string> list_devices(std::string* why) {
    if (!vk_load_loader(why)) return {};
    std::vector<std::string> out;
    try {
        VkInstance inst = make_instance(false, nullptr);
        const auto devs = physical_devices(inst);
        for (size_t i = 0; i < devs.size(); i++) out.push_back(describe(devs[i], static_cast<int>(i)));
        fns().vkDestroyInstance(inst, nullptr);
    } catch (const Error& e) {
        *why = e.what();
        return {};
    }
    if (out.empty()) *why = "the Vulkan loader lists no physical device (install a driver, e.g. mesa-vulkan-drivers)";
    return out;
}

// ---------------------------------------------------------------------------------------------

Context::Context(const Options& opt) : opt_(opt) {
    std::string why;
    if (!vk_load_loader(&why)) throw Error("device kind vulkan: " + why);
    Fns& f = fns();

    VkDebugUtilsMessengerCreateInfoEXT dbg{VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT};
    dbg.messageSeverity = VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT;
    dbg.messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                      VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT;
    dbg.pfnUserCallback = on_message;
    inst_ = make_instance(opt.validation, &dbg);
    if (opt.validation) vk_check(f.vkCreateDebugUtilsMessengerEXT(inst_, &dbg, nullptr, &messenger_), "debug messenger");

    const auto devs = physical_devices(inst_);
    if (opt.device_index < 0 || static_cast<size_t>(opt.device_index) >= devs.size()) {
        std::string found;
        for (size_t i = 0; i < devs.size(); i++) found += (i ? "; " : "") + describe(devs[i], static_cast<int>(i));
        release();
        throw Error("device kind vulkan, index " + std::to_string(opt.device_index) + ": expected a Vulkan device there, found " +
                    (devs.empty() ? std::string("none") : found) + " (set [device] index, or install a driver)");
    }
    phys_ = devs[static_cast<size_t>(opt.device_index)];

    VkPhysicalDeviceSubgroupProperties sub{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES};
    VkPhysicalDeviceMaintenance3Properties m3{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES};
    m3.pNext = &sub;
    VkPhysicalDeviceProperties2 props2{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2};
    props2.pNext = &m3;
    VkPhysicalDeviceDriverProperties drv{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES};
    sub.pNext = &drv;
    f.vkGetPhysicalDeviceProperties2(phys_, &props2);
    const VkPhysicalDeviceProperties& p = props2.properties;
    info_.name = p.deviceName;
    info_.driver = std::string(drv.driverName) + " " + drv.driverInfo;
    info_.type = type_name(p.deviceType);
    info_.api_version = p.apiVersion;
    info_.max_storage_buffer_range = p.limits.maxStorageBufferRange;
    info_.max_binding_bytes = info_.max_storage_buffer_range;
    if (opt.max_binding_bytes != 0 && opt.max_binding_bytes < info_.max_binding_bytes)
        info_.max_binding_bytes = opt.max_binding_bytes;
    info_.max_allocation_bytes = m3.maxMemoryAllocationSize;
    info_.min_storage_offset_align = p.limits.minStorageBufferOffsetAlignment;
    info_.subgroup_size = sub.subgroupSize;
    if (p.apiVersion < VK_API_VERSION_1_2) {
        release();
        throw Error("device kind vulkan: expected a Vulkan 1.2 device, found " + info_.name + " (Vulkan " +
                    version_str(p.apiVersion) + "); update the driver");
    }

    VkPhysicalDeviceVulkan12Features f12{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES};
    VkPhysicalDeviceFeatures2 feats{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2};
    feats.pNext = &f12;
    f.vkGetPhysicalDeviceFeatures2(phys_, &feats);
    if (!f12.timelineSemaphore) {
        release();
        throw Error("device kind vulkan: " + info_.name + " lacks timeline semaphores (Vulkan 1.2 core feature)");
    }

    uint32_t n_fam = 0;
    f.vkGetPhysicalDeviceQueueFamilyProperties(phys_, &n_fam, nullptr);
    std::vector<VkQueueFamilyProperties> fams(n_fam);
    f.vkGetPhysicalDeviceQueueFamilyProperties(phys_, &n_fam, fams.data());
    int comp = -1, xfer = -1;
    for (uint32_t i = 0; i < n_fam; i++) {
        if (comp < 0 && (fams[i].queueFlags & VK_QUEUE_COMPUTE_BIT)) comp = static_cast<int>(i);
        const bool transfer_only = (fams[i].queueFlags & VK_QUEUE_TRANSFER_BIT) &&
                                   !(fams[i].queueFlags & (VK_QUEUE_COMPUTE_BIT | VK_QUEUE_GRAPHICS_BIT));
        if (xfer < 0 && transfer_only) xfer = static_cast<int>(i);
    }
    if (comp < 0) {
        release();
        throw Error("device kind vulkan: " + info_.name + " has no compute queue");
    }
    if (!opt.use_transfer_queue) xfer = -1;
    info_.compute_family = static_cast<uint32_t>(comp);
    if (opt.use_timestamps && p.limits.timestampPeriod > 0) {
        info_.timestamp_valid_bits = fams[static_cast<size_t>(comp)].timestampValidBits;
        info_.timestamp_period_ns = p.limits.timestampPeriod;
    }
    info_.dedicated_transfer_queue = xfer >= 0;
    info_.transfer_family = xfer >= 0 ? static_cast<uint32_t>(xfer) : info_.compute_family;

    float prio = 1.0f;
    VkDeviceQueueCreateInfo qci[2] = {{VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO}, {VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO}};
    qci[0].queueFamilyIndex = info_.compute_family;
    qci[0].queueCount = 1;
    qci[0].pQueuePriorities = &prio;
    qci[1].queueFamilyIndex = info_.transfer_family;
    qci[1].queueCount = 1;
    qci[1].pQueuePriorities = &prio;
    VkPhysicalDeviceVulkan12Features want12{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES};
    want12.timelineSemaphore = VK_TRUE;
    VkDeviceCreateInfo dci{VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO};
    dci.pNext = &want12;
    dci.queueCreateInfoCount = info_.dedicated_transfer_queue ? 2 : 1;
    dci.pQueueCreateInfos = qci;
    try {
        vk_check(f.vkCreateDevice(phys_, &dci, nullptr, &dev_), "vkCreateDevice");
    } catch (...) {
        release();
        throw;
    }
    vk_load_device(dev_);
    f.vkGetDeviceQueue(dev_, info_.compute_family, 0, &comp_q_);
    xfer_q_ = comp_q_;
    if (info_.dedicated_transfer_queue) f.vkGetDeviceQueue(dev_, info_.transfer_family, 0, &xfer_q_);

    f.vkGetPhysicalDeviceMemoryProperties(phys_, &mem_props_);
    const uint32_t t = pick_memory_type(~0u, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT);
    info_.device_local_heap_bytes = mem_props_.memoryHeaps[mem_props_.memoryTypes[t].heapIndex].size;

    // One descriptor set layout and one pipeline layout for every shader: kMaxBindings storage
    // buffers and kPushBytes of push constants (the minimum every device guarantees).
    VkDescriptorSetLayoutBinding b[kMaxBindings];
    for (int i = 0; i < kMaxBindings; i++)
        b[i] = {static_cast<uint32_t>(i), VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 1, VK_SHADER_STAGE_COMPUTE_BIT, nullptr};
    VkDescriptorSetLayoutCreateInfo lci{VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO};
    lci.bindingCount = kMaxBindings;
    lci.pBindings = b;
    vk_check(f.vkCreateDescriptorSetLayout(dev_, &lci, nullptr, &set_layout_), "vkCreateDescriptorSetLayout");
    VkPushConstantRange pr{VK_SHADER_STAGE_COMPUTE_BIT, 0, kPushBytes};
    VkPipelineLayoutCreateInfo pci{VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO};
    pci.setLayoutCount = 1;
    pci.pSetLayouts = &set_layout_;
    pci.pushConstantRangeCount = 1;
    pci.pPushConstantRanges = &pr;
    vk_check(f.vkCreatePipelineLayout(dev_, &pci, nullptr, &layout_), "vkCreatePipelineLayout");
}

Context::~Context() { release(); }

void Context::release() {
    Fns& f = fns();
    if (dev_ != VK_NULL_HANDLE) {
        f.vkDeviceWaitIdle(dev_);
        for (auto& kv : pipelines_) f.vkDestroyPipeline(dev_, kv.second, nullptr);
        for (auto& kv : modules_) f.vkDestroyShaderModule(dev_, kv.second, nullptr);
        pipelines_.clear();
        modules_.clear();
        if (layout_ != VK_NULL_HANDLE) f.vkDestroyPipelineLayout(dev_, layout_, nullptr);
        if (set_layout_ != VK_NULL_HANDLE) f.vkDestroyDescriptorSetLayout(dev_, set_layout_, nullptr);
        f.vkDestroyDevice(dev_, nullptr);
        dev_ = VK_NULL_HANDLE;
    }
    if (messenger_ != VK_NULL_HANDLE) f.vkDestroyDebugUtilsMessengerEXT(inst_, messenger_, nullptr);
    messenger_ = VK_NULL_HANDLE;
    if (inst_ != VK_NULL_HANDLE) f.vkDestroyInstance(inst_, nullptr);
    inst_ = VK_NULL_HANDLE;
}

uint32_t Context::pick_memory_type(uint32_t bits, VkMemoryPropertyFlags want) const {
    for (uint32_t i = 0; i < mem_props_.memoryTypeCount; i++)
        if ((bits & (1u << i)) && (mem_props_.memoryTypes[i].propertyFlags & want) == want) return i;
    throw Error("vulkan: no memory type with flags " + std::to_string(want) + " for this buffer");
}

VkPipeline Context::pipeline(const char* name, uint32_t spec0) {
    std::lock_guard<std::mutex> lk(pipe_mu_);
    auto it = pipelines_.find({name, spec0});
    if (it != pipelines_.end()) return it->second;
    Fns& f = fns();
    VkShaderModule& mod = modules_[name];
    if (mod == VK_NULL_HANDLE) {
        int n = 0;
        const EmbeddedShader* table = embedded_shaders(&n);
        const EmbeddedShader* sh = nullptr;
        for (int i = 0; i < n; i++)
            if (std::strcmp(table[i].name, name) == 0) sh = &table[i];
        if (sh == nullptr) throw Error(std::string("vulkan: no embedded shader named ") + name);
        VkShaderModuleCreateInfo mci{VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO};
        mci.codeSize = static_cast<size_t>(sh->n_words) * 4;
        mci.pCode = sh->words;
        vk_check(f.vkCreateShaderModule(dev_, &mci, nullptr, &mod), "vkCreateShaderModule");
    }
    VkSpecializationMapEntry entry{0, 0, 4};
    VkSpecializationInfo spec{1, &entry, 4, &spec0};
    VkComputePipelineCreateInfo ci{VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO};
    ci.stage = {VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO};
    ci.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
    ci.stage.module = mod;
    ci.stage.pName = "main";
    ci.stage.pSpecializationInfo = &spec;
    ci.layout = layout_;
    VkPipeline pipe = VK_NULL_HANDLE;
    vk_check(f.vkCreateComputePipelines(dev_, VK_NULL_HANDLE, 1, &ci, nullptr, &pipe), "vkCreateComputePipelines");
    pipelines_[{name, spec0}] = pipe;
    return pipe;
}

void Context::alloc_device_block(uint64_t n_bytes, VkBuffer* buf, VkDeviceMemory* mem) {
    Fns& f = fns();
    VkBufferCreateInfo bci{VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO};
    bci.size = n_bytes;
    bci.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT;
    const uint32_t fam[2] = {info_.compute_family, info_.transfer_family};
    if (info_.dedicated_transfer_queue) {  // both queues use it without ownership transfers
        bci.sharingMode = VK_SHARING_MODE_CONCURRENT;
        bci.queueFamilyIndexCount = 2;
        bci.pQueueFamilyIndices = fam;
    }
    vk_check(f.vkCreateBuffer(dev_, &bci, nullptr, buf), "vkCreateBuffer (device block)");
    VkMemoryRequirements req;
    f.vkGetBufferMemoryRequirements(dev_, *buf, &req);
    VkMemoryAllocateInfo ai{VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO};
    ai.allocationSize = req.size;
    ai.memoryTypeIndex = pick_memory_type(req.memoryTypeBits, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT);
    const VkResult r = f.vkAllocateMemory(dev_, &ai, nullptr, mem);
    if (r != VK_SUCCESS) {
        f.vkDestroyBuffer(dev_, *buf, nullptr);
        *buf = VK_NULL_HANDLE;
        vk_check(r, ("vkAllocateMemory of " + std::to_string(n_bytes) + " device-local bytes").c_str());
    }
    vk_check(f.vkBindBufferMemory(dev_, *buf, *mem, 0), "vkBindBufferMemory");
}

void Context::free_device_block(VkBuffer buf, VkDeviceMemory mem) {
    if (buf != VK_NULL_HANDLE) fns().vkDestroyBuffer(dev_, buf, nullptr);
    if (mem != VK_NULL_HANDLE) fns().vkFreeMemory(dev_, mem, nullptr);
}

HostBuffer Context::alloc_host(uint64_t n_bytes) {
    Fns& f = fns();
    HostBuffer h;
    h.n_bytes = n_bytes;
    VkBufferCreateInfo bci{VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO};
    bci.size = n_bytes;
    bci.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT;
    const uint32_t fam[2] = {info_.compute_family, info_.transfer_family};
    if (info_.dedicated_transfer_queue) {
        bci.sharingMode = VK_SHARING_MODE_CONCURRENT;
        bci.queueFamilyIndexCount = 2;
        bci.pQueueFamilyIndices = fam;
    }
    vk_check(f.vkCreateBuffer(dev_, &bci, nullptr, &h.buf), "vkCreateBuffer (host)");
    VkMemoryRequirements req;
    f.vkGetBufferMemoryRequirements(dev_, h.buf, &req);
    VkMemoryAllocateInfo ai{VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO};
    ai.allocationSize = req.size;
    ai.memoryTypeIndex =
        pick_memory_type(req.memoryTypeBits, VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT);
    const VkResult r = f.vkAllocateMemory(dev_, &ai, nullptr, &h.mem);
    if (r != VK_SUCCESS) {
        f.vkDestroyBuffer(dev_, h.buf, nullptr);
        vk_check(r, ("vkAllocateMemory of " + std::to_string(n_bytes) + " host-visible bytes").c_str());
    }
    vk_check(f.vkBindBufferMemory(dev_, h.buf, h.mem, 0), "vkBindBufferMemory");
    void* p = nullptr;
    vk_check(f.vkMapMemory(dev_, h.mem, 0, VK_WHOLE_SIZE, 0, &p), "vkMapMemory");
    h.map = static_cast<uint8_t*>(p);
    return h;
}

void Context::free_host(HostBuffer& h) {
    if (h.buf == VK_NULL_HANDLE) return;
    fns().vkUnmapMemory(dev_, h.mem);
    fns().vkDestroyBuffer(dev_, h.buf, nullptr);
    fns().vkFreeMemory(dev_, h.mem, nullptr);
    h = HostBuffer{};
}

bool Context::submit_lost() {
    if (lost_.load()) return true;
    if (opt_.lose_device_after < 0 || n_submits_++ < opt_.lose_device_after) return false;
    lost_.store(true);
    return true;
}

Binding Context::bind(VkBuffer buf, uint64_t off, uint64_t n_bytes) const {
    const uint64_t align = info_.min_storage_offset_align < 4 ? 4 : info_.min_storage_offset_align;
    Binding b;
    b.buf = buf;
    b.offset = off / align * align;
    b.skip_bytes = static_cast<uint32_t>(off - b.offset);
    b.range = (b.skip_bytes + n_bytes + 3) / 4 * 4;
    if (b.range > info_.max_binding_bytes)
        throw InvalidArgument("vulkan: a binding of " + std::to_string(b.range) + " bytes exceeds the limit of " +
                              std::to_string(info_.max_binding_bytes) + " (maxStorageBufferRange); split the work");
    return b;
}

// ---------------------------------------------------------------------------------------------

CmdStream::CmdStream(Context& ctx, bool transfer) : ctx_(ctx), transfer_(transfer) {
    Fns& f = fns();
    VkCommandPoolCreateInfo ci{VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO};
    ci.flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT;
    ci.queueFamilyIndex = ctx.family(transfer);
    vk_check(f.vkCreateCommandPool(ctx.device(), &ci, nullptr, &cmd_pool_), "vkCreateCommandPool");
    VkSemaphoreTypeCreateInfo tci{VK_STRUCTURE_TYPE_SEMAPHORE_TYPE_CREATE_INFO};
    tci.semaphoreType = VK_SEMAPHORE_TYPE_TIMELINE;
    tci.initialValue = 0;
    VkSemaphoreCreateInfo sci{VK_STRUCTURE_TYPE_SEMAPHORE_CREATE_INFO};
    sci.pNext = &tci;
    vk_check(f.vkCreateSemaphore(ctx.device(), &sci, nullptr, &timeline_), "vkCreateSemaphore (timeline)");
}

CmdStream::~CmdStream() {
    Fns& f = fns();
    VkDevice d = ctx_.device();
    if (last_value_ > 0) {  // never destroy what the GPU may still run
        VkSemaphoreWaitInfo wi{VK_STRUCTURE_TYPE_SEMAPHORE_WAIT_INFO};
        wi.semaphoreCount = 1;
        wi.pSemaphores = &timeline_;
        wi.pValues = &last_value_;
        f.vkWaitSemaphores(d, &wi, UINT64_MAX);
    }
    for (Frame& fr : frames_)
        for (VkDescriptorPool p : fr.pools) f.vkDestroyDescriptorPool(d, p, nullptr);
    f.vkDestroyCommandPool(d, cmd_pool_, nullptr);
    f.vkDestroySemaphore(d, timeline_, nullptr);
}

uint64_t CmdStream::completed() const {
    uint64_t v = 0;
    vk_check(fns().vkGetSemaphoreCounterValue(ctx_.device(), timeline_, &v), "vkGetSemaphoreCounterValue");
    return v;
}

void CmdStream::wait(uint64_t value) {
    if (ctx_.lost()) vk_check(VK_ERROR_DEVICE_LOST, "vkWaitSemaphores (injected: LMX_VK_LOSE_DEVICE_AFTER)");
    VkSemaphoreWaitInfo wi{VK_STRUCTURE_TYPE_SEMAPHORE_WAIT_INFO};
    wi.semaphoreCount = 1;
    wi.pSemaphores = &timeline_;
    wi.pValues = &value;
    vk_check(fns().vkWaitSemaphores(ctx_.device(), &wi, UINT64_MAX), "vkWaitSemaphores");
}

VkCommandBuffer CmdStream::cmd() const { return frames_[static_cast<size_t>(cur_)].cb; }

VkCommandBuffer CmdStream::begin() {
    Fns& f = fns();
    const uint64_t done = completed();
    int pick = -1;
    for (size_t i = 0; i < frames_.size(); i++)
        if (frames_[i].value <= done) {
            pick = static_cast<int>(i);
            break;
        }
    if (pick < 0 && frames_.size() >= 8) {  // all in flight: wait for the oldest
        size_t oldest = 0;
        for (size_t i = 1; i < frames_.size(); i++)
            if (frames_[i].value < frames_[oldest].value) oldest = i;
        wait(frames_[oldest].value);
        pick = static_cast<int>(oldest);
    }
    if (pick < 0) {
        Frame fr;
        VkCommandBufferAllocateInfo ai{VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO};
        ai.commandPool = cmd_pool_;
        ai.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
        ai.commandBufferCount = 1;
        vk_check(f.vkAllocateCommandBuffers(ctx_.device(), &ai, &fr.cb), "vkAllocateCommandBuffers");
        frames_.push_back(fr);
        pick = static_cast<int>(frames_.size() - 1);
    }
    Frame& fr = frames_[static_cast<size_t>(pick)];
    for (VkDescriptorPool p : fr.pools) vk_check(f.vkResetDescriptorPool(ctx_.device(), p, 0), "vkResetDescriptorPool");
    fr.pool_i = 0;
    vk_check(f.vkResetCommandBuffer(fr.cb, 0), "vkResetCommandBuffer");
    VkCommandBufferBeginInfo bi{VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO};
    bi.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
    vk_check(f.vkBeginCommandBuffer(fr.cb, &bi), "vkBeginCommandBuffer");
    cur_ = pick;
    // Order this command buffer after every earlier transfer and compute on this queue.
    VkMemoryBarrier mb{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
    mb.srcAccessMask = VK_ACCESS_TRANSFER_WRITE_BIT | (transfer_ ? 0 : VK_ACCESS_SHADER_WRITE_BIT);
    mb.dstAccessMask = VK_ACCESS_TRANSFER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT |
                       (transfer_ ? 0 : VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT);
    const VkPipelineStageFlags stages =
        VK_PIPELINE_STAGE_TRANSFER_BIT | (transfer_ ? 0 : VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT);
    f.vkCmdPipelineBarrier(fr.cb, stages, stages, 0, 1, &mb, 0, nullptr, 0, nullptr);
    return fr.cb;
}

VkDescriptorSet CmdStream::alloc_set(Frame& fr) {
    Fns& f = fns();
    VkDescriptorSetLayout layout = ctx_.set_layout();
    for (;;) {
        if (fr.pool_i == fr.pools.size()) {
            VkDescriptorPoolSize size{VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 256 * Context::kMaxBindings};
            VkDescriptorPoolCreateInfo ci{VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO};
            ci.maxSets = 256;
            ci.poolSizeCount = 1;
            ci.pPoolSizes = &size;
            VkDescriptorPool p = VK_NULL_HANDLE;
            vk_check(f.vkCreateDescriptorPool(ctx_.device(), &ci, nullptr, &p), "vkCreateDescriptorPool");
            fr.pools.push_back(p);
        }
        VkDescriptorSetAllocateInfo ai{VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO};
        ai.descriptorPool = fr.pools[fr.pool_i];
        ai.descriptorSetCount = 1;
        ai.pSetLayouts = &layout;
        VkDescriptorSet set = VK_NULL_HANDLE;
        const VkResult r = f.vkAllocateDescriptorSets(ctx_.device(), &ai, &set);
        if (r == VK_SUCCESS) return set;
        if (r != VK_ERROR_OUT_OF_POOL_MEMORY && r != VK_ERROR_FRAGMENTED_POOL) vk_check(r, "vkAllocateDescriptorSets");
        fr.pool_i++;
    }
}

void CmdStream::dispatch(const char* name, uint32_t spec0, const Binding* binds, int n_binds, const void* push,
                         uint32_t push_bytes, uint32_t gx, uint32_t gy, uint32_t gz) {
    assert(cur_ >= 0 && n_binds >= 1 && n_binds <= Context::kMaxBindings && push_bytes <= Context::kPushBytes);
    Fns& f = fns();
    Frame& fr = frames_[static_cast<size_t>(cur_)];
    VkDescriptorSet set = alloc_set(fr);
    VkDescriptorBufferInfo infos[Context::kMaxBindings];
    VkWriteDescriptorSet writes[Context::kMaxBindings];
    for (int i = 0; i < Context::kMaxBindings; i++) {
        const Binding& b = binds[i < n_binds ? i : 0];  // unused slots repeat binding 0
        infos[i] = {b.buf, b.offset, b.range};
        writes[i] = {VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET};
        writes[i].dstSet = set;
        writes[i].dstBinding = static_cast<uint32_t>(i);
        writes[i].descriptorCount = 1;
        writes[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
        writes[i].pBufferInfo = &infos[i];
    }
    f.vkUpdateDescriptorSets(ctx_.device(), Context::kMaxBindings, writes, 0, nullptr);
    f.vkCmdBindPipeline(fr.cb, VK_PIPELINE_BIND_POINT_COMPUTE, ctx_.pipeline(name, spec0));
    f.vkCmdBindDescriptorSets(fr.cb, VK_PIPELINE_BIND_POINT_COMPUTE, ctx_.pipeline_layout(), 0, 1, &set, 0, nullptr);
    uint8_t pc[Context::kPushBytes] = {};
    std::memcpy(pc, push, push_bytes);
    f.vkCmdPushConstants(fr.cb, ctx_.pipeline_layout(), VK_SHADER_STAGE_COMPUTE_BIT, 0, Context::kPushBytes, pc);
    f.vkCmdDispatch(fr.cb, gx, gy, gz);
    VkMemoryBarrier mb{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
    mb.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_SHADER_READ_BIT;
    mb.dstAccessMask = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_READ_BIT |
                       VK_ACCESS_TRANSFER_WRITE_BIT;
    f.vkCmdPipelineBarrier(fr.cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT,
                           VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT, 0, 1, &mb, 0, nullptr, 0,
                           nullptr);
}

void CmdStream::barrier_to_host() {
    VkMemoryBarrier mb{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
    mb.srcAccessMask = VK_ACCESS_TRANSFER_WRITE_BIT | (transfer_ ? 0 : VK_ACCESS_SHADER_WRITE_BIT);
    mb.dstAccessMask = VK_ACCESS_HOST_READ_BIT;
    fns().vkCmdPipelineBarrier(cmd(), VK_PIPELINE_STAGE_TRANSFER_BIT | (transfer_ ? 0 : VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT),
                               VK_PIPELINE_STAGE_HOST_BIT, 0, 1, &mb, 0, nullptr, 0, nullptr);
}

void CmdStream::reset_queries(VkQueryPool pool, uint32_t first, uint32_t n) {
    fns().vkCmdResetQueryPool(cmd(), pool, first, n);
}

void CmdStream::timestamp(VkQueryPool pool, uint32_t query, VkPipelineStageFlagBits stage) {
    fns().vkCmdWriteTimestamp(cmd(), stage, pool, query);
}

void CmdStream::copy(VkBuffer src, VkBuffer dst, const VkBufferCopy* regions, uint32_t n_regions) {
    if (n_regions == 0) return;
    fns().vkCmdCopyBuffer(cmd(), src, dst, n_regions, regions);
    VkMemoryBarrier mb{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
    mb.srcAccessMask = VK_ACCESS_TRANSFER_WRITE_BIT;
    mb.dstAccessMask = VK_ACCESS_TRANSFER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT |
                       (transfer_ ? 0 : VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT);
    fns().vkCmdPipelineBarrier(cmd(), VK_PIPELINE_STAGE_TRANSFER_BIT,
                               VK_PIPELINE_STAGE_TRANSFER_BIT | (transfer_ ? 0 : VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT), 0, 1,
                               &mb, 0, nullptr, 0, nullptr);
}

void CmdStream::discard() {
    if (cur_ < 0) return;
    fns().vkEndCommandBuffer(frames_[static_cast<size_t>(cur_)].cb);
    cur_ = -1;
}

uint64_t CmdStream::submit(const std::vector<std::pair<VkSemaphore, uint64_t>>& waits) {
    assert(cur_ >= 0);
    Fns& f = fns();
    Frame& fr = frames_[static_cast<size_t>(cur_)];
    cur_ = -1;
    vk_check(f.vkEndCommandBuffer(fr.cb), "vkEndCommandBuffer");
    std::vector<VkSemaphore> wsem;
    std::vector<uint64_t> wval;
    std::vector<VkPipelineStageFlags> wstage;
    for (const auto& w : waits) {
        if (w.second == 0) continue;
        wsem.push_back(w.first);
        wval.push_back(w.second);
        wstage.push_back(transfer_ ? VK_PIPELINE_STAGE_TRANSFER_BIT
                                   : VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT);
    }
    const uint64_t value = last_value_ + 1;
    VkTimelineSemaphoreSubmitInfo ti{VK_STRUCTURE_TYPE_TIMELINE_SEMAPHORE_SUBMIT_INFO};
    ti.waitSemaphoreValueCount = static_cast<uint32_t>(wval.size());
    ti.pWaitSemaphoreValues = wval.data();
    ti.signalSemaphoreValueCount = 1;
    ti.pSignalSemaphoreValues = &value;
    VkSubmitInfo si{VK_STRUCTURE_TYPE_SUBMIT_INFO};
    si.pNext = &ti;
    si.waitSemaphoreCount = static_cast<uint32_t>(wsem.size());
    si.pWaitSemaphores = wsem.data();
    si.pWaitDstStageMask = wstage.data();
    si.commandBufferCount = 1;
    si.pCommandBuffers = &fr.cb;
    si.signalSemaphoreCount = 1;
    si.pSignalSemaphores = &timeline_;
    if (ctx_.submit_lost()) vk_check(VK_ERROR_DEVICE_LOST, "vkQueueSubmit (injected: LMX_VK_LOSE_DEVICE_AFTER)");
    {
        std::lock_guard<std::mutex> lk(ctx_.queue_mutex(transfer_));
        vk_check(f.vkQueueSubmit(ctx_.queue(transfer_), 1, &si, VK_NULL_HANDLE), "vkQueueSubmit");
    }
    fr.value = value;
    last_value_ = value;
    return value;
}

}  // namespace lmx::vk
